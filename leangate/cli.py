"""The ``leangate`` command: ``serve``, ``up``, ``policy``, ``cache``, ``corpus``, ``model`` and
``bench <name>``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

BENCHMARKS: dict[str, str] = {
    "passthrough": "leangate.bench.passthrough",
    "cache": "leangate.bench.cache",
    "profile": "leangate.bench.profile",
    "sot": "leangate.bench.sot",
    "compress": "leangate.bench.compress",
    "conversation": "leangate.bench.conversation",
    "decompose": "leangate.bench.decompose",
    "rag": "leangate.bench.rag",
    "load": "leangate.bench.load",
    "all": "leangate.bench.all_benchmarks",
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        _bench(args.name, args.rest)
        return
    handler = {
        "serve": _serve,
        "policy": _policy,
        "up": _up,
        "cache": _cache,
        "corpus": _corpus,
        "model": _model,
    }[args.command]
    sys.exit(handler(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leangate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--backend-url", action="append", help="a backend replica; repeat for several"
    )
    serve.add_argument("--policy", type=Path, help="policy YAML file (reloaded on change)")
    serve.add_argument("--redis-url", help="Redis for shared caches; default: in-process")
    serve.add_argument("--log-level", default=None)

    policy = commands.add_parser("policy", help="policy files")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_commands.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path)
    policy_commands.add_parser("doc", help="print the policy reference (docs/policy.md)")

    up = commands.add_parser("up", help="start local vLLM and the proxy, and try a request")
    from leangate import up as up_module

    up_module.add_arguments(up)

    cache = commands.add_parser("cache", help="the result cache")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    purge = cache_commands.add_parser("purge", help="delete entries by tenant and/or namespace")
    purge.add_argument("--redis-url", required=True)
    purge.add_argument("--tenant")
    purge.add_argument("--namespace")
    stats = cache_commands.add_parser("stats", help="count entries by tenant and/or namespace")
    stats.add_argument("--redis-url", required=True)
    stats.add_argument("--tenant")
    stats.add_argument("--namespace")

    corpus = commands.add_parser("corpus", help="named corpora on a running proxy")
    from leangate import corpus_cli

    corpus_cli.add_arguments(corpus)

    model = commands.add_parser("model", help="the bundled model, its vLLM and the embedder")
    from leangate import model_cli

    model_cli.add_arguments(model)

    bench = commands.add_parser("bench", help="run a benchmark", add_help=False)
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from leangate import logs
    from leangate.middleware.app import create_app
    from leangate.settings import Settings

    overrides: dict[str, object] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.backend_url:
        overrides["backend_url"] = ",".join(args.backend_url)
    if args.policy:
        overrides["policy"] = args.policy
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    if args.log_level:
        overrides["log_level"] = args.log_level
    settings = Settings(**overrides)  # type: ignore[arg-type]
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        loop="uvloop",
        http="httptools",
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    return 0


def _policy(args: argparse.Namespace) -> int:
    if args.policy_command == "doc":
        from leangate.policy_doc import render

        sys.stdout.write(render())
        return 0
    return _policy_check(args)


def _policy_check(args: argparse.Namespace) -> int:
    from leangate.middleware.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    stages = sum(len(rule.stages) for rule in policy.rules)
    print(
        f"{args.file}: ok ({len(policy.rules)} rules, {stages} stages, "
        f"{len(policy.tenants)} tenants)"
    )
    return 0


def _up(args: argparse.Namespace) -> int:
    from leangate import up

    return up.run(args)


def _cache(args: argparse.Namespace) -> int:
    """``cache purge`` or ``cache stats``, straight on the Redis the proxies share."""
    import asyncio

    from leangate.cache.purge import purge
    from leangate.cache.stats import count_entries
    from leangate.cache.store import RedisStore, StoreError

    async def run() -> str:
        store = RedisStore(args.redis_url, timeout_s=5.0)
        try:
            scope = {"tenant": args.tenant, "namespace": args.namespace}
            if args.cache_command == "stats":
                counts = await count_entries(store, **scope)
                return f"{counts.answers} answers, {counts.semantic} semantic entries"
            return f"deleted {await purge(store, **scope)} entries"
        finally:
            await store.close()

    try:
        print(asyncio.run(run()))
    except (ValueError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _corpus(args: argparse.Namespace) -> int:
    from leangate import corpus_cli

    return corpus_cli.run(args)


def _model(args: argparse.Namespace) -> int:
    from leangate import model_cli

    return model_cli.run(args)


def _bench(name: str, rest: Sequence[str]) -> None:
    module = importlib.import_module(BENCHMARKS[name])
    parser = argparse.ArgumentParser(prog=f"leangate bench {name}")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    result = module.run(args)
    from leangate.bench.common import emit

    emit(result)
