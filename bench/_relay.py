"""Stand-in proxy for self-testing the benchmark harness -- NOT the product.

A tiny aiohttp relay that accepts the proxy's command-line shape
(``serve --host H --port P --backend-url URL``) and forwards every request to the
first backend, streaming the body through.  Use it with
``--proxy-command "python -m leangate.bench._relay serve"`` until the real proxy
exists.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "content-encoding",
}

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
BACKEND: web.AppKey[str] = web.AppKey("backend", str)


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _forward(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    url = request.app[BACKEND] + request.rel_url.path_qs
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    body = await request.read()
    async with session.request(request.method, url, data=body or None, headers=headers) as up:
        out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP}
        if "text/event-stream" not in up.headers.get("content-type", ""):
            payload = await up.read()
            return web.Response(status=up.status, body=payload, headers=out_headers)
        response = web.StreamResponse(status=up.status, headers=out_headers)
        await response.prepare(request)
        async for chunk in up.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _make_app(backend: str) -> web.Application:
    app = web.Application()
    app[BACKEND] = backend.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/health", _health)
    app.router.add_route("*", "/{tail:.*}", _forward)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="benchmark self-test relay")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend-url", action="append", required=True)
    args, _unknown = parser.parse_known_args(argv)
    app = _make_app(args.backend_url[0])
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
