"""Policies given to the SDK: a ``Policy``, a file, or YAML text."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leangate.middleware.policy import Policy


def resolve_policy(
    source: Policy | str | os.PathLike[str] | None,
) -> tuple[Policy, Path | None]:
    """The policy, and the file it came from (which the runtime then watches).

    A ``str`` holding a newline or ``": "`` is YAML text (``"rules: []"``); any other
    ``str``, and any path, names a file. ``None`` is the proxy's default policy (an exact
    result cache for every request).
    """
    from leangate.middleware.policy import Policy, load_policy, parse_policy

    if isinstance(source, Policy):
        return source, None
    if isinstance(source, str) and ("\n" in source or ": " in source):
        return parse_policy(source, "<policy text>"), None
    path = None if source is None else Path(source)
    return load_policy(path), path


def check_policy(source: str | os.PathLike[str]) -> Policy:
    """Validate a policy file or YAML text as the proxy would load it; raises
    ``PolicyError``, whose message names every invalid field."""
    return resolve_policy(source)[0]
