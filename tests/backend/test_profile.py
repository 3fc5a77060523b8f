"""The backend profile's model, fitted on synthetic samples from a known backend."""

from __future__ import annotations

import pytest

from leangate.backend.profile import BackendProfile, Sample


def _truth(prompt: int, out: int, batch: float) -> Sample:
    """A backend with 40 ms overhead, 500 prompt tokens/s, and decode steps of
    30 ms + 6 ms per sequence + 0.02 ms per context token."""
    ttft = 0.04 + prompt / 500
    step = 0.030 + 0.006 * batch + 0.00002 * batch * (prompt + out / 2)
    return Sample(prompt, out, ttft, ttft + (out - 1) * step, batch)


def test_the_profile_recovers_a_known_backend() -> None:
    profile = BackendProfile()
    for prompt in (20, 400, 1200):
        profile.observe(_truth(prompt, 1, 1))
    for prompt, out, batch in [(30, 32, 1), (900, 32, 1), (30, 32, 8), (200, 64, 4)]:
        profile.observe(_truth(prompt, out, batch))
    for prompt, out, parallel in [(50, 100, 1), (1000, 20, 1), (100, 64, 8)]:
        expected = _truth(prompt, out, parallel)
        predicted = profile.predict(prompt, out, parallel=parallel, load=0)
        if parallel == 1:
            assert predicted == pytest.approx(expected.total_s, rel=0.1)
        else:  # n prompts prefilled one after another, then decoded together
            decode = expected.total_s - expected.ttft_s
            assert predicted == pytest.approx(0.04 + parallel * 100 / 500 + decode, rel=0.1)


def test_load_and_a_warm_prefix_change_the_prediction() -> None:
    profile = BackendProfile()
    for prompt, batch in [(20, 1), (800, 1), (20, 8), (400, 4)]:
        profile.observe(_truth(prompt, 32, batch))
    idle = profile.predict(800, 32, load=0)
    assert profile.predict(800, 32, load=6) > idle
    assert profile.predict(800, 32, load=0, cached_tokens=700) < idle


def test_vllm_metrics_give_the_load() -> None:
    profile = BackendProfile()
    text = "\n".join(
        [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
            'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0',
            'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0',
        ]
    )
    profile.read_metrics([text, 'vllm:num_requests_running{model_name="m"} 1.0'])
    assert profile.reported_load == 6.0
