"""What a prompt-shrinking stage costs and saves, for deciding whether to run it.

A stage's cost is its own measured time per 1,000 prompt tokens (an average of its recent
requests, starting from a prior); the saving is the backend profile's predicted time of the
request before minus after (``services.profile``). Both stages that shrink prompts
(``compress``, ``rag``) use it.
"""

from __future__ import annotations

from leangate.backend.profile import BackendProfile

EWMA_WEIGHT = 0.2
DEFAULT_ANSWER_TOKENS = 16
"""The answer length a saving is predicted for when the client set no ``max_tokens``."""


class OwnCost:
    """A stage's time per 1,000 prompt tokens, averaged over its requests (EWMA)."""

    def __init__(self, prior_ms_per_1k: float) -> None:
        self.ms_per_1k = prior_ms_per_1k

    def predict_s(self, tokens: int) -> float:
        return self.ms_per_1k * tokens / 1e6

    def measured(self, seconds: float, tokens: int) -> None:
        if tokens > 0:
            sample = seconds * 1e6 / tokens
            self.ms_per_1k += EWMA_WEIGHT * (sample - self.ms_per_1k)


def predicted_saving(
    profile: BackendProfile, answer_tokens: int, before: int, after: int, uncalibrated_tps: float
) -> tuple[float, bool]:
    """Seconds saved by sending ``after`` instead of ``before`` prompt tokens, and whether
    the backend profile said so (until it is calibrated: the token difference at
    ``uncalibrated_tps``, a fast backend, so the saving is under-predicted)."""
    if not profile.calibrated:
        return (before - after) / uncalibrated_tps, False
    return profile.predict(before, answer_tokens) - profile.predict(after, answer_tokens), True


def net_saving(
    profile: BackendProfile,
    answer_tokens: int,
    before: int,
    after: int,
    own_s: float,
    uncalibrated_tps: float,
) -> float:
    """Seconds a shortened prompt saved, by the profile's prediction, less the stage's own
    time: what ``leangate_stage_saved_seconds`` adds up."""
    saved, _ = predicted_saving(profile, answer_tokens, before, after, uncalibrated_tps)
    return saved - own_s
