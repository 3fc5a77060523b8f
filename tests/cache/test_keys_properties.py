"""Cache keys of any request the proxy accepts: they never fail, are plain, ignore key
order and the fields that do not change the answer, and keep tenants apart."""

from __future__ import annotations

import random
import re
from typing import Any

import orjson
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from leangate.backend.client import BackendClient, BackendSettings
from leangate.cache.keys import (
    NOT_IN_KEY,
    answer_key,
    exact_hash,
    scope_prefix,
    semantic_key,
    semantic_parts,
)
from leangate.middleware.body import MAX_JSON_DEPTH, parse_object
from leangate.middleware.context import RequestContext
from leangate.middleware.protocol import ChatCompletionRequest

KEY = re.compile(r"lg:[0-9a-f]{16}:[0-9a-f]{16}:(ans|sem):[0-9a-f]{64}")
BACKEND = BackendClient(BackendSettings())

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant"]),
        "content": st.text(max_size=30) | _json,
    }
)
_extras = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k not in {"model", "messages", "leangate"}),
    _json,
    max_size=4,
)


@st.composite
def _bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A chat request as the proxy accepts it: through its JSON parser and validation."""
    body = {
        **draw(_extras),
        "model": draw(st.text(max_size=12)),
        "messages": draw(st.lists(_message, min_size=1, max_size=4)),
    }
    parsed = parse_object(orjson.dumps(body))
    try:
        ChatCompletionRequest.model_validate(parsed)
    except ValueError:
        return {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return parsed


def _ctx(body: dict[str, Any], tenant: str = "t") -> RequestContext:
    return RequestContext.validated("chat", body, tenant=tenant, backend=BACKEND)


def _shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


@settings(max_examples=150, deadline=None)
@given(body=_bodies(), tenant=st.text(max_size=20), namespace=st.text(max_size=20))
def test_keys_of_any_accepted_request_are_plain(
    body: dict[str, Any], tenant: str, namespace: str
) -> None:
    ctx = _ctx(body, tenant)
    digest = exact_hash(ctx)
    assert KEY.fullmatch(answer_key(ctx, namespace, digest))
    assert KEY.fullmatch(semantic_key(ctx, namespace, digest))
    assert answer_key(ctx, namespace, digest).startswith(scope_prefix(tenant, namespace))
    semantic_parts(ctx, namespace)


UNKEYED = {"stream": True, "stream_options": {"include_usage": True}, "user": "someone"}


@settings(max_examples=150, deadline=None)
@given(body=_bodies(), seed=st.integers(), unkeyed=st.sampled_from(sorted(UNKEYED)))
def test_key_order_and_unkeyed_fields_do_not_change_the_key(
    body: dict[str, Any], seed: int, unkeyed: str
) -> None:
    assert set(UNKEYED) == NOT_IN_KEY
    shuffled = _shuffled(body, random.Random(seed))
    assert exact_hash(_ctx(shuffled)) == exact_hash(_ctx(body))
    assert exact_hash(_ctx({**body, unkeyed: UNKEYED[unkeyed]})) == exact_hash(_ctx(body))


@settings(max_examples=150, deadline=None)
@given(body=_bodies(), field=st.text(min_size=1, max_size=10), value=_json)
def test_any_other_field_changes_the_key(body: dict[str, Any], field: str, value: Any) -> None:
    assume(field not in NOT_IN_KEY | {"model", "messages"} and body.get(field, ...) != value)
    try:
        changed = _ctx({**body, field: value})
    except ValidationError:
        return  # a field the proxy validates, given a value it refuses
    assert exact_hash(changed) != exact_hash(_ctx(body))


@settings(max_examples=150, deadline=None)
@given(body=_bodies(), tenants=st.lists(st.text(max_size=12), min_size=2, max_size=2, unique=True))
def test_tenants_never_share_a_key(body: dict[str, Any], tenants: list[str]) -> None:
    first, second = (_ctx(body, tenant) for tenant in tenants)
    digest = exact_hash(first)
    assert answer_key(first, "ns", digest) != answer_key(second, "ns", digest)
    parts = [semantic_parts(ctx, "ns") for ctx in (first, second)]
    assert parts[0] is None or parts[0] != parts[1]


def test_a_body_as_deep_as_accepted_has_keys() -> None:
    deep: Any = "bottom"
    for _ in range(MAX_JSON_DEPTH - 1):
        deep = [deep]
    body = parse_object(
        orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "d": deep})
    )
    assert KEY.fullmatch(answer_key(_ctx(body), "ns", exact_hash(_ctx(body))))
