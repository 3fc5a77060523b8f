"""A bare relay on leangate's own stack, the floor the proxy's overhead is measured against.

uvicorn (uvloop, httptools) in front of one pooled aiohttp session, forwarding every POST
to the first backend and relaying the answer, streamed or not: no validation, policy,
pipeline or metrics. It takes the proxy's command-line shape, so

    leangate bench passthrough --parts responder \\
        --proxy-command "python -m leangate.bench._relay serve"

measures what uvicorn + aiohttp alone cost on this machine. NOT the product.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn

Message = dict[str, Any]


class Relay:
    def __init__(self, backend: str) -> None:
        self.backend = backend.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["path"] == "/health":
            await _answer(send, 200, b"application/json", b'{"status":"ok"}')
        else:
            await self._forward(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(auto_decompress=False)
                await send({"type": "lifespan.startup.complete"})
            else:
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Message, receive: Any, send: Any) -> None:
        assert self.session is not None
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {"content-type": "application/json"}
        url = self.backend + scope["path"]
        async with self.session.request(scope["method"], url, data=body, headers=headers) as up:
            content_type = up.headers.get("content-type", "application/json").encode()
            if not content_type.startswith(b"text/event-stream"):
                await _answer(send, up.status, content_type, await up.read())
                return
            start = {"type": "http.response.start", "status": up.status}
            await send({**start, "headers": [(b"content-type", content_type)]})
            async for chunk in up.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


async def _answer(send: Any, status: int, content_type: bytes, body: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="bare uvicorn + aiohttp relay (benchmark floor)")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend-url", action="append", required=True)
    args, _unknown = parser.parse_known_args(argv)
    uvicorn.run(
        Relay(args.backend_url[0]),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
        proxy_headers=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
