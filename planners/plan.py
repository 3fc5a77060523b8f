"""A decomposition plan: sub-questions and what each needs, as bounded, checked data.

The decomposer writes one numbered sub-question per line, under a regular expression
(vLLM structured outputs) that lets a step name only earlier steps:

    1. Which river runs through the town of Alderford?
    2. How long is the Wendle canal?
    3. Is that river longer than the canal? (uses 1, 2)

So a well-behaved backend cannot produce a cycle. The parser still checks everything (a
backend may ignore the pattern, a plan may come back from the cache): at most
``MAX_STEPS`` steps and ``MAX_DEPTH`` levels, references to existing earlier steps only,
questions of plain text, bounded in length. A plan that fails any check is refused whole
(``PlanError``), and the request is answered directly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_STEPS = 5
MIN_STEPS = 2
MAX_DEPTH = 3
QUESTION_CHARS = 80

_LINE = re.compile(r"^\s*(\d{1,2})[.)]\s+(.+?)\s*(?:\(uses ([\d,\s]+)\))?\s*$")
_UNSAFE = re.compile(r"[^\w\s,;:'&/+%.?!$-]", re.UNICODE)


class PlanError(ValueError):
    """The plan cannot be used; the request is answered directly."""


@dataclass(frozen=True)
class Step:
    number: int
    """1-based, as written in the plan."""
    question: str
    needs: tuple[int, ...] = ()


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]

    def depth(self) -> int:
        """Levels of the plan: 1 when every step is independent."""
        level: dict[int, int] = {}
        for step in self.steps:
            level[step.number] = 1 + max((level[n] for n in step.needs), default=0)
        return max(level.values(), default=0)

    def to_data(self) -> list[dict[str, Any]]:
        return [{"question": s.question, "needs": list(s.needs)} for s in self.steps]

    @classmethod
    def from_data(cls, data: Any) -> Plan:
        """A plan read back from the cache, checked like a new one."""
        if not isinstance(data, list):
            raise PlanError("a stored plan is not a list")
        steps = []
        for number, item in enumerate(data, 1):
            if not isinstance(item, dict) or not isinstance(item.get("question"), str):
                raise PlanError("a stored step has no question")
            needs = item.get("needs")
            if not isinstance(needs, list) or not all(isinstance(n, int) for n in needs):
                raise PlanError("a stored step's needs are not numbers")
            steps.append(Step(number, _clean(item["question"]), tuple(needs)))
        return checked(steps)


QUESTION_WORDS = "What|Which|Who|When|Where|How|Why|Is|Are|Does|Do|Did|Was|Were|Can|Should|Will"
"""A line must open like a question: left free, the bundled 135M model wrote answers."""


def plan_regex(max_steps: int = MAX_STEPS) -> str:
    """``MIN_STEPS`` to ``max_steps`` numbered questions; step i may use steps before i."""
    limit = QUESTION_CHARS - 12
    text = rf"({QUESTION_WORDS}) [^\n().?!]{{3,{limit}}}\?"
    lines = []
    for i in range(1, max_steps + 1):
        uses = ""
        if i > 1:
            earlier = f"[1-{i - 1}]"
            uses = rf"( \(uses {earlier}(, {earlier}){{0,3}}\))?"
        line = rf"{i}\. {text}{uses}\n"
        lines.append(line if i <= MIN_STEPS else f"({line})?")
    return "".join(lines)


def parse_plan(text: str, max_steps: int = MAX_STEPS) -> Plan:
    """The plan in a decomposer's answer, or ``PlanError``. A question written twice is
    one step (a later step that uses either line uses that step)."""
    steps: list[Step] = []
    same_as: dict[int, int] = {}  # line number -> step number
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        number = int(match.group(1))
        if number != len(same_as) + 1:
            raise PlanError(f"step {number} is out of order")
        if not match.group(2).endswith("?"):
            raise PlanError(f"step {number} is not a question")
        question = _clean(match.group(2))
        earlier = next((s.number for s in steps if s.question.lower() == question.lower()), None)
        if earlier is not None:
            same_as[number] = earlier
            continue
        uses = {int(n) for n in re.findall(r"\d+", match.group(3) or "")}
        if any(n not in same_as for n in uses):
            raise PlanError(f"step {number} uses a step that is not before it")
        same_as[number] = len(steps) + 1
        steps.append(Step(len(steps) + 1, question, tuple(sorted({same_as[n] for n in uses}))))
        if len(steps) > max_steps:
            raise PlanError(f"the plan has more than {max_steps} steps")
    return checked(steps, max_steps)


def checked(steps: Sequence[Step], max_steps: int = MAX_STEPS) -> Plan:
    """``steps`` as a plan if they pass every check, else ``PlanError``."""
    if not MIN_STEPS <= len(steps) <= max_steps:
        raise PlanError(f"a plan has {MIN_STEPS} to {max_steps} steps, not {len(steps)}")
    seen: set[str] = set()
    for step in steps:
        if len(step.question) < 5:
            raise PlanError(f"step {step.number} has no question")
        if step.question.lower() in seen:
            raise PlanError(f"step {step.number} repeats an earlier one")
        seen.add(step.question.lower())
        for need in step.needs:
            if not 1 <= need < step.number:
                raise PlanError(f"step {step.number} uses step {need}, which is not before it")
    plan = Plan(tuple(steps))
    if plan.depth() > MAX_DEPTH:
        raise PlanError(f"the plan is deeper than {MAX_DEPTH} levels")
    return plan


def _clean(question: str) -> str:
    """Plain text only, bounded: a sub-question is asked of the model, nothing else."""
    return " ".join(_UNSAFE.sub(" ", question).split())[:QUESTION_CHARS]
