"""``leangate corpus ingest|list|delete``: the corpus routes of a running proxy, from a shell.

``ingest`` reads ``.txt`` and ``.md`` files (a document each; its id is its path relative
to the files' common parent, ``metadata.source`` the path) and ``.jsonl`` files (one
``{"id", "text", "metadata"?}`` per line); folders are read recursively. Documents are
posted in batches of ``--batch`` (fewer when a batch would pass the request size limit).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

TEXT_SUFFIXES = (".txt", ".md")
MAX_BATCH_BYTES = 3 * 1024 * 1024
"""Under the proxy's default body limit (4 MiB)."""


class CorpusCliError(Exception):
    """A problem to report on one line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="corpus_command", required=True)
    ingest = commands.add_parser("ingest", help="add .txt, .md and .jsonl files to a corpus")
    ingest.add_argument("name")
    ingest.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    ingest.add_argument("--batch", type=int, default=64, help="documents per request")
    listing = commands.add_parser("list", help="your corpora")
    delete = commands.add_parser("delete", help="drop a corpus, or only some documents")
    delete.add_argument("name")
    delete.add_argument("--ids", nargs="+", help="delete these documents only")
    for command in (ingest, listing, delete):
        command.add_argument("--url", default="http://127.0.0.1:8080", help="the proxy")
        command.add_argument(
            "--api-key",
            default=os.environ.get("LEANGATE_API_KEY"),
            help="your API key (default: $LEANGATE_API_KEY)",
        )


def run(args: argparse.Namespace) -> int:
    try:
        with _client(args.url, args.api_key) as client:
            if args.corpus_command == "ingest":
                ingest(client, args.name, args.paths, batch=args.batch)
            elif args.corpus_command == "list":
                for line in list_corpora(client):
                    print(line)
            else:
                print(delete(client, args.name, args.ids))
    except (CorpusCliError, httpx.HTTPError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600)


# --- reading files ---------------------------------------------------------------------------


def read_documents(paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """The documents of the files under ``paths``, in path order."""
    files = sorted({f for p in paths for f in _files(p)})
    if not files:
        raise CorpusCliError("no .txt, .md or .jsonl files found")
    texts = [f for f in files if f.suffix in TEXT_SUFFIXES]
    parent = Path(os.path.commonpath([f.parent for f in texts])) if texts else None
    for file in files:
        if file.suffix == ".jsonl":
            yield from _jsonl(file)
        else:
            assert parent is not None
            text = file.read_text(encoding="utf-8")
            if text.strip():
                yield {
                    "id": file.relative_to(parent).as_posix(),
                    "text": text,
                    "metadata": {"source": str(file)},
                }


def _files(path: Path) -> Iterator[Path]:
    if not path.exists():
        raise CorpusCliError(f"{path}: no such file or folder")
    candidates = path.rglob("*") if path.is_dir() else [path]
    for file in candidates:
        if file.is_file() and file.suffix in (*TEXT_SUFFIXES, ".jsonl"):
            yield file.resolve()


def _jsonl(file: Path) -> Iterator[dict[str, Any]]:
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise CorpusCliError(f"{file}:{number}: not JSON ({exc})") from None
            if not isinstance(record, dict) or "id" not in record or "text" not in record:
                raise CorpusCliError(f"{file}:{number}: expected an object with id and text")
            yield record


def batches(documents: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Runs of at most ``size`` documents and about ``MAX_BATCH_BYTES`` of JSON."""
    batch: list[dict[str, Any]] = []
    weight = 0
    for document in documents:
        cost = len(orjson.dumps(document))
        if batch and (len(batch) >= size or weight + cost > MAX_BATCH_BYTES):
            yield batch
            batch, weight = [], 0
        batch.append(document)
        weight += cost
    if batch:
        yield batch


# --- the API ---------------------------------------------------------------------------------


def ingest(client: httpx.Client, name: str, paths: Sequence[Path], *, batch: int = 64) -> int:
    """Post every document; returns how many chunks were added."""
    from rich.progress import Progress

    if batch < 1:
        raise CorpusCliError("--batch must be at least 1")
    documents = list(read_documents(paths))
    chunks = 0
    with Progress(transient=True) as progress:
        task = progress.add_task(f"ingesting into {name}", total=len(documents))
        for part in batches(iter(documents), batch):
            answer = _call(client, "POST", f"/v1/corpora/{name}/documents", {"documents": part})
            chunks += int(answer["chunks"])
            progress.advance(task, len(part))
    print(f"{name}: {len(documents)} documents, {chunks} chunks added", file=sys.stderr)
    return chunks


def list_corpora(client: httpx.Client) -> list[str]:
    data = _call(client, "GET", "/v1/corpora")["data"]
    return [f"{c['name']}\t{c['documents']} documents\t{c['chunks']} chunks" for c in data]


def delete(client: httpx.Client, name: str, ids: Sequence[str] | None) -> str:
    if ids:
        answer = _call(client, "POST", f"/v1/corpora/{name}/documents/delete", {"ids": list(ids)})
        return f"{name}: {answer['deleted']} documents deleted"
    _call(client, "DELETE", f"/v1/corpora/{name}")
    return f"{name}: dropped"


def _call(
    client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    content = None if body is None else orjson.dumps(body)
    headers = {"content-type": "application/json"} if content is not None else {}
    response = client.request(method, path, content=content, headers=headers)
    if response.status_code != 200:
        raise CorpusCliError(f"{response.status_code}: {_message(response)}")
    answer: dict[str, Any] = response.json()
    return answer


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase
