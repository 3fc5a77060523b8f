"""What the proxy tells whom: the admin key, /health's detail, the API docs."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest import ProxyThread, proxy_settings

from leangate.backend.transport import HttpxTransport

MODELS = {"object": "list", "data": [{"id": "m", "object": "model"}]}


def _backend(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=MODELS)


@pytest.fixture(scope="module")
def proxy() -> Iterator[ProxyThread]:
    settings = proxy_settings("http://backend.test", admin_api_key="admin-key")
    with ProxyThread(settings, HttpxTransport(httpx.MockTransport(_backend))) as running:
        yield running


def test_health_shows_replica_urls_only_to_the_admin(proxy: ProxyThread) -> None:
    public = httpx.get(proxy.url + "/health")
    assert public.status_code == 200
    assert public.json()["replicas"] == 1 and public.json()["replicas_healthy"] == 1
    assert "backend.test" not in public.text
    admin = httpx.get(proxy.url + "/health", headers={"authorization": "Bearer admin-key"})
    assert admin.json()["replicas"][0]["url"] == "http://backend.test"


def test_a_non_ascii_admin_key_is_refused_not_a_crash(proxy: ProxyThread) -> None:
    for key in ("clé-ünïcode", "admin-key\u00e9", "admin"):
        response = httpx.post(
            proxy.url + "/admin/cache/purge",
            json={"tenant": "t"},
            headers={b"authorization": f"Bearer {key}".encode()},
        )
        assert response.status_code == 401, key
        assert response.json()["error"]["type"] == "authentication_error"


def test_api_docs_are_off_by_default(proxy: ProxyThread) -> None:
    assert httpx.get(proxy.url + "/docs").status_code == 404
    assert httpx.get(proxy.url + "/openapi.json").status_code == 404


def test_keys_are_secrets_in_settings_and_policies() -> None:
    from leangate.middleware.policy import Policy

    settings = proxy_settings("http://backend.test", admin_api_key="admin-key")
    assert "admin-key" not in repr(settings)
    policy = Policy.model_validate({"tenants": {"a": {"api_keys": ["sk-secret"]}}})
    assert "sk-secret" not in repr(policy)
    assert policy.tenant_for_key("sk-secret") == "a"
