"""Schemathesis against the served OpenAPI schema, in front of a fake backend.

Every check schemathesis has runs on every case: no 5xx, status codes, content types and
bodies as documented, schema-valid requests accepted and schema-invalid ones refused.
CI runs ``FUZZ_CASES_DEFAULT`` cases per operation and mode; ``LEANGATE_FUZZ_CASES=N``
runs N (the figures in docs/reliability.md, "Bad input", come from N = 150).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from conftest import MODEL, ProxyThread, proxy_settings, write_policy
from fake_backend import fake_transport
from hypothesis import HealthCheck, given, settings
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode, HookContext
from schemathesis.core.result import Ok

from leangate.middleware.app import create_app
from leangate.retrieval.corpora import CORPUS_NAME
from leangate.settings import Settings

FUZZ_CASES_DEFAULT = 20
FUZZ_CASES = int(os.environ.get("LEANGATE_FUZZ_CASES") or FUZZ_CASES_DEFAULT)
POLICY = """
rules:
  - name: everything
    stages:
      - use: cache
"""
REFUSED = ["400", "401", "404", "409", "413", "429"]
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": REFUSED}}}
)
"""A body over the size limit is refused with 413, which schemathesis does not expect by
default; unlike its default, 5xx never counts as refusing."""
SEEN: Counter[str] = Counter()
"""Cases run, by operation and status class; checked by ``test_fuzz_figures``."""


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    folder = tmp_path_factory.mktemp("fuzz")
    settings = proxy_settings(
        "http://backend.test",
        policy=write_policy(folder, POLICY),
        corpus_dir=folder / "corpora",
        expose_docs=True,
    )
    with ProxyThread(settings, fake_transport()) as running:
        yield running


def _schema() -> BaseSchema:
    """The schema the proxy serves, built in-process so tests can be collected from it;
    ``test_the_served_schema_is_this_one`` checks the proxy serves the same."""
    app = create_app(Settings(backend_url="http://backend.test", expose_docs=True))
    schema = schemathesis.openapi.from_dict(app.api.openapi(), config=CONFIG)
    schema.hook("map_body")(_served_model)
    schema.hook("filter_body")(_unique_document_ids)
    schema.hook("map_path_parameters")(_few_corpora)
    return schema


def _served_model(context: HookContext, body: Any) -> Any:
    """Name the model the backend serves, so that requests get past the model check and
    through the pipeline (a model it does not serve is a 404, tested apart)."""
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return {**body, "model": MODEL}
    return body


def _few_corpora(context: HookContext, parameters: Any) -> Any:
    """Valid corpus names to one of three, so that corpora are created, searched and
    dropped (a random name is almost always an unknown corpus); invalid names stay."""
    name = parameters.get("name") if isinstance(parameters, dict) else None
    if isinstance(name, str) and CORPUS_NAME.fullmatch(name):
        return {**parameters, "name": f"fuzz-{len(name) % 3}"}
    return parameters


def _unique_document_ids(context: HookContext, body: Any) -> bool:
    """A batch naming an id twice is a 400 the schema cannot express (``uniqueItems``
    compares whole documents); such batches are tested apart."""
    documents = body.get("documents") if isinstance(body, dict) else None
    if not isinstance(documents, list):
        return True
    ids = [d.get("id") for d in documents if isinstance(d, dict)]
    return len(ids) == len({json.dumps(i) for i in ids})


SCHEMA = _schema()


Operation = APIOperation[Any, Any, Any, Any]


def _operations() -> dict[str, Operation]:
    found = {}
    for result in SCHEMA.get_all_operations():
        assert isinstance(result, Ok), result
        found[result.ok().label] = result.ok()
    return found


OPERATIONS = _operations()


def _order(label: str) -> tuple[bool, bool, str]:
    """Deletions last, and dropping corpora after them, so that there is something to
    delete."""
    return label.startswith("DELETE"), label.endswith("{name}"), label


CASES = [
    (label, mode)
    for label, operation in sorted(OPERATIONS.items(), key=lambda item: _order(item[0]))
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or len(operation.body) or len(operation.path_parameters)
]
"""Negative cases only where a request has something to get wrong."""


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{lb}-{m.value}" for lb, m in CASES])
def test_the_proxy_keeps_to_its_schema(
    label: str, mode: GenerationMode, fuzzed: ProxyThread
) -> None:
    """Every built-in check of schemathesis on ``FUZZ_CASES`` cases of one operation."""
    session = requests.Session()

    @given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    @settings(
        max_examples=FUZZ_CASES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case[Operation]) -> None:
        response = case.call(base_url=fuzzed.url, session=session)
        SEEN[f"{label} {response.status_code // 100}xx"] += 1
        case.validate_response(response, transport_kwargs={"base_url": fuzzed.url})

    with session:
        run()


def test_the_served_schema_is_this_one(fuzzed: ProxyThread) -> None:
    served = httpx.get(fuzzed.url + "/openapi.json")
    assert served.status_code == 200
    assert served.json() == SCHEMA.raw_schema


def test_fuzz_figures(fuzzed: ProxyThread) -> None:
    """Every operation got cases, none a 5xx, and the proxy is healthy after."""
    if not SEEN:
        pytest.skip("figures of test_the_proxy_keeps_to_its_schema, which did not run")
    print(f"\nfuzz cases: {sum(SEEN.values())}", dict(sorted(SEEN.items())))
    assert {key.rsplit(" ", 1)[0] for key in SEEN} == set(OPERATIONS)
    assert not [key for key in SEEN if key.endswith(" 5xx")], SEEN
    assert httpx.get(fuzzed.url + "/health").status_code == 200
