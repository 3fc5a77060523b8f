"""The files under ``deploy/``, checked offline: no network, no Docker, no cluster.

- ``compose.yaml``: services and their keys, and every ``LEANGATE_*`` variable a setting
  of leangate reads (a misspelt one would be ignored silently by the proxy); the values
  parse into ``Settings``; the backend list names both vLLM services, the Redis URL the
  Redis service, the policy is mounted and valid, nginx balances over both proxies.
- ``k8s/*.yaml``: every object against the Kubernetes OpenAPI schemas shipped in
  ``kubernetes-validate`` (strict: unknown fields fail), then how they refer to one
  another (Services to pods, probes to routes, env to settings, ConfigMap to the policy
  file, Secret keys, the autoscaler's target, the vLLM replicas' stable names).
- ``Dockerfile``: the base, a non-root user, every package folder copied and installed,
  the entrypoint a real ``leangate`` command, the health check a real route.

Each check returns the problems it found; the ``*_catches_*`` tests break a copy of the
files on purpose and expect a problem, so a check that stopped checking fails too.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from pydantic import AliasChoices, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from leangate.cache.embedder import EmbedderSettings
from leangate.cache.semantic import SemanticSettings
from leangate.cache.store import MemoryStoreSettings
from leangate.cli import _parser
from leangate.middleware.app import create_app
from leangate.middleware.policy import PolicyError, parse_policy
from leangate.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
POLICY_FILE = DEPLOY / "policy" / "policy.yaml"
K8S_VERSIONS = ("1.28.0", "1.37.0")
"""The oldest Kubernetes the manifests are meant for, and the newest schema shipped."""
NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "admin-secret.yaml"}
"""The admin Secret is a template: applied as it is, its key would be public."""
VLLM_PORT = 8000
"""vLLM's default port, when its arguments name none."""

Doc = dict[str, Any]

# --- what leangate reads -----------------------------------------------------------------

SETTINGS_CLASSES: tuple[type[BaseSettings], ...] = (
    Settings,
    EmbedderSettings,
    MemoryStoreSettings,
    SemanticSettings,
)
READ_FROM_ENVIRON = frozenset({"LEANGATE_HOME"})
"""Variables read with ``os.environ`` rather than through a settings class."""


def env_inputs(cls: type[BaseSettings]) -> dict[str, str]:
    """The environment variables ``cls`` reads, each with the key it takes as input."""
    prefix = str(cls.model_config.get("env_prefix") or "")
    inputs: dict[str, str] = {}
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            inputs.update((c, c) for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, str):
            inputs[alias] = alias
        else:
            inputs[f"{prefix}{name}".upper()] = name
    return inputs


def env_names() -> frozenset[str]:
    """Every environment variable a settings class of leangate reads."""
    names = set(READ_FROM_ENVIRON)
    for cls in SETTINGS_CLASSES:
        names.update(env_inputs(cls))
    return frozenset(names)


def env_problems(where: str, env: dict[str, str]) -> list[str]:
    known = env_names()
    return [
        f"{where}: {name} is not a setting of leangate"
        for name in sorted(env)
        if name.startswith("LEANGATE_") and name not in known
    ]


class _GivenSettings(Settings):
    """``Settings`` from the values given only, not from this process's environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def settings_from(env: dict[str, str]) -> Settings:
    """``Settings`` as the proxy would read them from exactly ``env``."""
    inputs = env_inputs(Settings)
    given = {inputs[name]: value for name, value in env.items() if name in inputs}
    return _GivenSettings.model_validate(given)


@functools.cache
def app_routes() -> frozenset[str]:
    app = create_app(settings_from({}))
    return frozenset(str(getattr(route, "path", "")) for route in app.api.routes)


def policy_problems(where: str, text: str) -> list[str]:
    try:
        parse_policy(text, where)
    except PolicyError as exc:
        return [str(exc)]
    return []


def url_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or {"http": 80, "https": 443, "redis": 6379}.get(
        parts.scheme, 0
    )


def arg_after(args: list[str], flag: str, default: int) -> int:
    return int(args[args.index(flag) + 1]) if flag in args else default


# --- compose --------------------------------------------------------------------------------

COMPOSE_TOP_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
COMPOSE_SERVICE_KEYS = frozenset(
    re.findall(
        r"\S+",
        """
        annotations attach blkio_config build cap_add cap_drop cgroup cgroup_parent command
        configs container_name cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period
        cpu_rt_runtime cpu_shares cpus cpuset credential_spec depends_on deploy develop
        device_cgroup_rules devices dns dns_opt dns_search domainname entrypoint env_file
        environment expose extends external_links extra_hosts gpus group_add healthcheck
        hostname image init ipc isolation labels label_file links logging mac_address mem_limit
        mem_reservation mem_swappiness memswap_limit network_mode networks oom_kill_disable
        oom_score_adj pid pids_limit platform ports post_start pre_stop privileged profiles
        pull_policy read_only restart runtime scale secrets security_opt shm_size stdin_open
        stop_grace_period stop_signal storage_opt sysctls tmpfs tty ulimits user userns_mode
        uts volumes volumes_from working_dir
        """,
    )
)
"""The Compose Specification's service attributes."""

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` as if no variable
    were set, except required ones (a stand-in value)."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name, operator, argument = match.groups()
            if operator in (":-", "-"):
                return str(argument)
            if operator in (":?", "?"):
                return f"given-{name.lower()}"
            return ""

        return _VARIABLE.sub(replace, value)
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    return value


def load_compose() -> Doc:
    loaded: Doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def service_env(service: Doc) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(str(item).split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def mounts(service: Doc) -> Iterator[tuple[str, str]]:
    """(host path or volume, container path) of each volume."""
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            yield str(volume.get("source", "")), str(volume["target"])
        else:
            source, target = str(volume).split(":")[:2]
            yield source, target


def seconds(duration: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def roles(services: dict[str, Doc]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {"proxy": [], "vllm": [], "redis": [], "lb": []}
    for name, service in services.items():
        build = service.get("build")
        image = str(service.get("image", ""))
        if isinstance(build, dict):
            dockerfile = (
                DEPLOY / build.get("context", ".") / build.get("dockerfile", "")
            ).resolve()
            if dockerfile == DEPLOY / "Dockerfile":
                found["proxy"].append(name)
        elif image.startswith("vllm/vllm-openai"):
            found["vllm"].append(name)
        elif image.startswith("redis:"):
            found["redis"].append(name)
        elif image.startswith("nginx:"):
            found["lb"].append(name)
    return found


def compose_problems(raw: Doc, nginx: str) -> list[str]:
    problems = [
        f"compose: unknown top-level key {key!r}"
        for key in raw
        if key not in COMPOSE_TOP_KEYS and not key.startswith("x-")
    ]
    compose = interpolate(raw)
    services: dict[str, Doc] = compose.get("services") or {}
    for name, service in services.items():
        problems += [
            f"compose: service {name}: unknown key {key!r}"
            for key in service
            if key not in COMPOSE_SERVICE_KEYS and not key.startswith("x-")
        ]
    found = roles(services)
    for role, count in {"proxy": 2, "vllm": 2, "redis": 1, "lb": 1}.items():
        if len(found[role]) != count:
            problems.append(f"compose: {count} {role} service(s) expected, found {found[role]}")
    if problems:
        return problems

    vllm_urls = [
        (
            name,
            arg_after([str(a) for a in services[name].get("command") or []], "--port", VLLM_PORT),
        )
        for name in found["vllm"]
    ]
    image_env = dockerfile_env(instructions(load_dockerfile()[0]))
    (redis_name,) = found["redis"]
    proxy_ports: set[int] = set()
    backend_lists: set[str] = set()
    for name in found["proxy"]:
        service = services[name]
        env = service_env(service)
        where = f"compose: {name}"
        problems += env_problems(where, env)
        try:
            settings = settings_from(image_env | env)
        except ValidationError as exc:
            problems.append(f"{where}: {exc}")
            continue
        proxy_ports.add(settings.port)
        backend_lists.add(settings.backend_url)
        backends = sorted(url_of(u) for u in settings.backend_urls())
        if backends != sorted(vllm_urls):
            problems.append(f"{where}: LEANGATE_BACKEND_URL {backends} is not {sorted(vllm_urls)}")
        if settings.redis_url is None or url_of(settings.redis_url)[0] != redis_name:
            problems.append(f"{where}: LEANGATE_REDIS_URL does not name {redis_name!r}")
        if settings.admin_api_key is None:
            problems.append(f"{where}: no LEANGATE_ADMIN_API_KEY")
        problems += _compose_policy_problems(where, service, settings)
        grace = seconds(str(service.get("stop_grace_period", "10s")))
        if grace <= settings.drain_timeout_s:
            problems.append(f"{where}: stop_grace_period {grace} s <= drain timeout")
        check = service.get("healthcheck")
        if check is not None and "/health" not in json.dumps(check):
            problems.append(f"{where}: its healthcheck does not ask /health")
    if len(backend_lists) > 1:
        problems.append("compose: the proxies list the vLLM replicas differently (affinity)")
    problems += _nginx_problems(nginx, services[found["lb"][0]], found["proxy"], proxy_ports)
    return problems


def _compose_policy_problems(where: str, service: Doc, settings: Settings) -> list[str]:
    if settings.policy is None:
        return [f"{where}: no LEANGATE_POLICY"]
    policy = PurePosixPath(str(settings.policy))
    for source, target in mounts(service):
        if PurePosixPath(target) == policy.parent:
            host_file = DEPLOY / source / policy.name
            if not host_file.is_file():
                return [f"{where}: {host_file} is missing"]
            if host_file.resolve() != POLICY_FILE:
                return [f"{where}: mounts {host_file}, not {POLICY_FILE}"]
            return policy_problems(str(host_file), host_file.read_text())
    return [f"{where}: the folder of {policy} is not mounted (a file mount misses reloads)"]


def _nginx_problems(nginx: str, lb: Doc, proxies: list[str], ports: set[int]) -> list[str]:
    problems: list[str] = []
    config = re.sub(r"#[^\n]*", "", nginx)
    upstreams = dict(re.findall(r"upstream\s+(\S+)\s*\{([^}]*)\}", config))
    passes = re.findall(r"proxy_pass\s+https?://([^/;\s]+)", config)
    if not passes or any(p not in upstreams for p in passes):
        problems.append(f"nginx: proxy_pass {passes} names no upstream of {sorted(upstreams)}")
    servers = {s for body in upstreams.values() for s in re.findall(r"server\s+([^\s;]+)", body)}
    expected = {f"{p}:{port}" for p in proxies for port in ports}
    if servers != expected:
        problems.append(f"nginx: upstream servers {sorted(servers)} are not {sorted(expected)}")
    listens = {int(p) for p in re.findall(r"listen\s+(\d+)", config)}
    published = {int(str(p).split(":")[-1]) for p in lb.get("ports") or []}
    if not published or not published <= listens:
        problems.append(f"nginx: listens on {listens}, compose publishes {published}")
    body = re.search(r"client_max_body_size\s+(\d+)m", config)
    if body is None or int(body.group(1)) * 2**20 <= settings_from({}).max_body_bytes:
        problems.append("nginx: client_max_body_size must exceed LEANGATE_MAX_BODY_BYTES")
    sources = [DEPLOY / s for s, target in mounts(lb) if target == "/etc/nginx/nginx.conf"]
    if [s.resolve() for s in sources] != [DEPLOY / "nginx.conf"]:
        problems.append("compose: deploy/nginx.conf is not mounted into the load balancer")
    return problems


def load_nginx() -> str:
    return (DEPLOY / "nginx.conf").read_text()


# --- Dockerfile -----------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()))
    found = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def dockerfile_env(steps: list[tuple[str, str]]) -> dict[str, str]:
    """The image's environment (``ENV name=value ...``)."""
    env: dict[str, str] = {}
    for op, args in steps:
        if op == "ENV":
            for item in shlex.split(args):
                name, equals, value = item.partition("=")
                if equals:
                    env[name] = value
    return env


def _exec_form(where: str, args: str, problems: list[str]) -> list[str]:
    try:
        value = json.loads(args)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"Dockerfile: {where} is not in exec form (a JSON list)")
        return []
    return [str(v) for v in value]


def dockerfile_problems(text: str, ignore: str) -> list[str]:
    problems: list[str] = []
    steps = instructions(text)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    froms = [args for op, args in steps if op == "FROM"]
    if len(froms) != 1 or not re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", froms[0]):
        problems.append(f"Dockerfile: FROM {froms} is not python:3.11-slim")
    users = [args for op, args in steps if op == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("Dockerfile: the last USER is not a non-root user")

    copied = {
        PurePosixPath(src).as_posix().rstrip("/")
        for op, args in steps
        if op == "COPY" and not args.startswith("--from")
        for src in shlex.split(args)[:-1]
        if not src.startswith("--")
    }
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    needed = folders | {"pyproject.toml", pyproject["project"]["readme"]}
    problems += [f"Dockerfile: {n} is not copied" for n in sorted(needed - copied)]
    allowed = {line.strip()[1:].rstrip("/") for line in ignore.splitlines() if line.startswith("!")}
    problems += [
        f"Dockerfile.dockerignore: {n} is left out of the build context"
        for n in sorted(copied - allowed)
    ]
    workdirs = [args for op, args in steps if op == "WORKDIR"]
    installs = [args for op, args in steps if op == "RUN" and re.search(r"pip install", args)]
    targets = {m for run in installs for m in re.findall(r"pip install\s+(\S+)", run)}
    if not targets & ({".", *workdirs}):
        problems.append(f"Dockerfile: no `pip install` of the copied package ({targets})")

    env = dockerfile_env(steps)
    problems += env_problems("Dockerfile ENV", env)
    try:
        settings_from(env)
    except ValidationError as exc:
        problems.append(f"Dockerfile ENV: {exc}")

    entry = [args for op, args in steps if op == "ENTRYPOINT"]
    cmd = [args for op, args in steps if op == "CMD"]
    argv = _exec_form("ENTRYPOINT", entry[-1], problems) if entry else []
    argv += _exec_form("CMD", cmd[-1], problems) if cmd else []
    scripts = pyproject["project"]["scripts"]
    if not argv or scripts.get(argv[0]) != "leangate.cli:main":
        problems.append(f"Dockerfile: the entrypoint {argv} does not run the leangate command")
    else:
        try:
            parsed = _parser().parse_args(argv[1:])
        except SystemExit:
            parsed = None
        if parsed is None or parsed.command != "serve":
            problems.append(f"Dockerfile: `{' '.join(argv)}` is not `leangate serve`")

    checks = [args for op, args in steps if op == "HEALTHCHECK"]
    paths = re.findall(r"/health\b", checks[-1]) if checks else []
    if not paths or "/health" not in app_routes():
        problems.append("Dockerfile: no HEALTHCHECK on /health")
    return problems


def load_dockerfile() -> tuple[str, str]:
    return (DEPLOY / "Dockerfile").read_text(), (DEPLOY / "Dockerfile.dockerignore").read_text()


# --- Kubernetes -----------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_manifests() -> list[Doc]:
    return [doc for path in manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def schema_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except (
                kubernetes_validate.ValidationError,
                kubernetes_validate.SchemaNotFoundError,
            ) as exc:
                name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
                path = "/".join(str(p) for p in getattr(exc, "path", []))
                problems.append(f"k8s {version} {name} {path}: {exc.message}")
    return problems


def _find(docs: list[Doc], kind: str, name: str) -> Doc | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def _pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def _selects(service: Doc, workload: Doc) -> bool:
    selector = service["spec"].get("selector") or {}
    labels = workload["spec"]["template"]["metadata"].get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _container_port(pod: Doc, port: int | str) -> int | None:
    for container in pod["containers"]:
        for p in container.get("ports") or []:
            if port in (p.get("name"), p["containerPort"]):
                return int(p["containerPort"])
    return None


def _container_env(container: Doc, secrets: list[Doc]) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    problems: list[str] = []
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = (item.get("valueFrom") or {}).get("secretKeyRef")
        if ref is None:
            continue
        secret = next((s for s in secrets if s["metadata"]["name"] == ref["name"]), None)
        values = {**(secret or {}).get("data", {}), **(secret or {}).get("stringData", {})}
        if secret is None or ref["key"] not in values:
            problems.append(f"k8s: {item['name']} refers to a missing Secret key {ref}")
        env[item["name"]] = "from-a-secret"
    return env, problems


def k8s_problems(docs: list[Doc]) -> list[str]:
    problems: list[str] = []
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    services = [d for d in docs if d["kind"] == "Service"]
    for service in services:
        targets = [w for w in workloads if _selects(service, w)]
        name = service["metadata"]["name"]
        if not targets:
            problems.append(f"k8s: Service {name} selects no pods")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if any(_container_port(_pod_spec(w), target) is None for w in targets):
                problems.append(f"k8s: Service {name}: targetPort {target} is no container port")

    proxy = _find(docs, "Deployment", "leangate")
    vllm = next((w for w in workloads if w["kind"] == "StatefulSet"), None)
    redis = _find(docs, "Deployment", "redis")
    if proxy is None or vllm is None or redis is None:
        return [*problems, "k8s: the leangate and redis Deployments and a vLLM StatefulSet"]
    problems += _vllm_problems(vllm, services)
    problems += _proxy_problems(docs, proxy, vllm, redis, services)
    return problems


def _vllm_problems(vllm: Doc, services: list[Doc]) -> list[str]:
    problems = []
    headless = next(
        (s for s in services if s["metadata"]["name"] == vllm["spec"]["serviceName"]), None
    )
    if headless is None or headless["spec"].get("clusterIP") != "None":
        problems.append("k8s: the vLLM StatefulSet's serviceName is not a headless Service")
    for container in _pod_spec(vllm)["containers"]:
        resources = container.get("resources") or {}
        if "nvidia.com/gpu" not in (resources.get("limits") or {}):
            problems.append(f"k8s: vLLM container {container['name']} requests no GPU")
    return problems


def _proxy_problems(
    docs: list[Doc], proxy: Doc, vllm: Doc, redis: Doc, services: list[Doc]
) -> list[str]:
    problems: list[str] = []
    pod = _pod_spec(proxy)
    (container,) = pod["containers"]
    secrets = [d for d in docs if d["kind"] == "Secret"]
    env, found = _container_env(container, secrets)
    problems += found + env_problems("k8s: Deployment leangate", env)
    try:
        settings = settings_from(env)
    except ValidationError as exc:
        return [*problems, f"k8s: Deployment leangate: {exc}"]
    if proxy["spec"].get("replicas") != 2:
        problems.append("k8s: the proxy Deployment does not start 2 replicas")
    if _container_port(pod, settings.port) is None:
        problems.append(f"k8s: the proxy listens on {settings.port}, not a container port")

    routes = app_routes()
    for probe, want in (("readinessProbe", "/health"), ("livenessProbe", None)):
        get = (container.get(probe) or {}).get("httpGet") or {}
        path = get.get("path")
        if path not in routes or (want is not None and path != want):
            problems.append(f"k8s: {probe} asks {path!r}, want {want or 'a route of the app'}")
        elif _container_port(pod, get["port"]) != settings.port:
            problems.append(f"k8s: {probe} asks port {get['port']}, not the proxy's")

    # Every vLLM replica by its stable name, as a StatefulSet's headless Service gives them.
    vllm_args = [str(a) for c in _pod_spec(vllm)["containers"] for a in c.get("args") or []]
    vllm_port = arg_after(vllm_args, "--port", VLLM_PORT)
    name, service = vllm["metadata"]["name"], vllm["spec"]["serviceName"]
    expected = [(f"{name}-{i}.{service}", vllm_port) for i in range(vllm["spec"]["replicas"])]
    if [url_of(u) for u in settings.backend_urls()] != expected:
        problems.append(f"k8s: LEANGATE_BACKEND_URL {settings.backend_url} is not {expected}")

    redis_services = [s for s in services if _selects(s, redis)]
    reachable = {
        (s["metadata"]["name"], p["port"]) for s in redis_services for p in s["spec"]["ports"]
    }
    if settings.redis_url is None or url_of(settings.redis_url) not in reachable:
        problems.append(f"k8s: LEANGATE_REDIS_URL is none of the Redis Services {reachable}")
    if settings.admin_api_key is None:
        problems.append("k8s: no LEANGATE_ADMIN_API_KEY")

    problems += _k8s_policy_problems(docs, pod, container, settings)
    problems += _drain_problems(pod, container, settings)
    problems += _autoscaler_problems(docs, proxy, container)
    return problems


def _k8s_policy_problems(
    docs: list[Doc], pod: Doc, container: Doc, settings: Settings
) -> list[str]:
    if settings.policy is None:
        return ["k8s: no LEANGATE_POLICY"]
    policy = PurePosixPath(str(settings.policy))
    mount = next(
        (
            m
            for m in container.get("volumeMounts") or []
            if PurePosixPath(m["mountPath"]) == policy.parent
        ),
        None,
    )
    if mount is None or "subPath" in mount:
        return [f"k8s: the folder of {policy} is not mounted whole (a subPath misses updates)"]
    volume: Doc = next((v for v in pod.get("volumes") or [] if v["name"] == mount["name"]), {})
    config_map = _find(docs, "ConfigMap", (volume.get("configMap") or {}).get("name", ""))
    text = ((config_map or {}).get("data") or {}).get(policy.name)
    if text is None:
        return [f"k8s: no ConfigMap with {policy.name} is mounted at {policy.parent}"]
    if text != POLICY_FILE.read_text():
        return [f"k8s: the policy ConfigMap is not the text of {POLICY_FILE.relative_to(ROOT)}"]
    return policy_problems("k8s ConfigMap", text)


def _drain_problems(pod: Doc, container: Doc, settings: Settings) -> list[str]:
    command = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get(
        "command"
    ) or []
    pause = int(command[1]) if len(command) == 2 and command[0] == "sleep" else 0
    grace = int(pod.get("terminationGracePeriodSeconds", 30))
    if grace <= pause + settings.drain_timeout_s:
        return [
            f"k8s: grace period {grace} s <= preStop {pause} s + drain {settings.drain_timeout_s} s"
        ]
    return []


def _autoscaler_problems(docs: list[Doc], proxy: Doc, container: Doc) -> list[str]:
    scalers = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": proxy["metadata"]["name"]}
    scaler = next((s for s in scalers if s["spec"]["scaleTargetRef"] == target), None)
    if scaler is None:
        return ["k8s: no HorizontalPodAutoscaler targets the proxy Deployment"]
    problems = []
    if scaler["spec"].get("minReplicas", 1) < 2:
        problems.append("k8s: the autoscaler may go below 2 proxy replicas")
    metrics = [m.get("resource", {}).get("name") for m in scaler["spec"].get("metrics") or []]
    if metrics != ["cpu"]:
        problems.append(f"k8s: the autoscaler scales on {metrics}, not CPU")
    if "cpu" not in ((container.get("resources") or {}).get("requests") or {}):
        problems.append("k8s: CPU utilisation needs the proxy container's CPU request")
    return problems


# --- the tests ------------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.name for p in files} >= {"compose.yaml", "policy.yaml", "kustomization.yaml"}
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_the_known_settings_are_what_leangate_reads() -> None:
    names = env_names()
    assert {"LEANGATE_BACKEND_URL", "LEANGATE_REDIS_URL", "LEANGATE_DRAIN_TIMEOUT_S"} <= names
    assert "LEANGATE_EMBED_THREADS" in names
    for name in READ_FROM_ENVIRON:
        assert any(name in p.read_text() for p in (ROOT / "backend").glob("*.py")), name


def test_compose() -> None:
    assert compose_problems(load_compose(), load_nginx()) == []


def test_dockerfile() -> None:
    assert dockerfile_problems(*load_dockerfile()) == []


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    docs = load_manifests()
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "StatefulSet",
        "HorizontalPodAutoscaler",
    }
    assert schema_problems(docs) == []


def test_k8s_manifests_refer_to_each_other() -> None:
    assert k8s_problems(load_manifests()) == []


def test_kustomization_lists_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in manifest_files()} - NOT_IN_KUSTOMIZATION


def test_the_policy_file_is_valid() -> None:
    assert policy_problems(str(POLICY_FILE), POLICY_FILE.read_text()) == []


# --- the checks catch what they are for -----------------------------------------------------


def _proxy_env(compose: Doc) -> dict[str, Any]:
    env: dict[str, Any] = compose["x-proxy"]["environment"]
    return env


def _rename_env(compose: Doc) -> None:
    env = _proxy_env(compose)
    env["LEANGATE_REDIS_ULR"] = env.pop("LEANGATE_REDIS_URL")


def _one_backend(compose: Doc) -> None:
    _proxy_env(compose)["LEANGATE_BACKEND_URL"] = "http://vllm-1:8000"


def _bad_port(compose: Doc) -> None:
    _proxy_env(compose)["LEANGATE_PORT"] = "eighty"


def _service_key_typo(compose: Doc) -> None:
    compose["services"]["redis"]["enviroment"] = {"A": "b"}


def _policy_file_mount(compose: Doc) -> None:
    compose["x-proxy"]["volumes"] = ["./policy/policy.yaml:/etc/leangate/policy.yaml:ro"]


@pytest.mark.parametrize(
    ("break_it", "expect"),
    [
        (_rename_env, "LEANGATE_REDIS_ULR is not a setting"),
        (_one_backend, "LEANGATE_BACKEND_URL"),
        (_bad_port, "port"),
        (_service_key_typo, "unknown key 'enviroment'"),
        (_policy_file_mount, "is not mounted"),
    ],
)
def test_compose_check_catches(break_it: Callable[[Doc], None], expect: str) -> None:
    compose = copy.deepcopy(load_compose())
    break_it(compose)
    problems = compose_problems(compose, load_nginx())
    assert any(expect in p for p in problems), problems


def test_compose_check_catches_an_nginx_upstream_that_is_no_proxy() -> None:
    nginx = load_nginx().replace("proxy-2:8080", "proxy-3:8080")
    problems = compose_problems(load_compose(), nginx)
    assert any("upstream servers" in p for p in problems), problems


@pytest.mark.parametrize(
    ("old", "new", "expect"),
    [
        (
            'ENTRYPOINT ["leangate", "serve"]',
            'ENTRYPOINT ["leangate", "serv"]',
            "is not `leangate serve`",
        ),
        ('ENTRYPOINT ["leangate", "serve"]', "ENTRYPOINT leangate serve", "exec form"),
        ("USER leangate", "USER root", "non-root"),
        ("COPY retrieval/ retrieval/\n", "", "retrieval is not copied"),
        ("LEANGATE_CORPUS_DIR=", "LEANGATE_CORPUS_DIRS=", "LEANGATE_CORPUS_DIRS is not a setting"),
        ("FROM python:3.11-slim", "FROM python:3.12", "python:3.11-slim"),
    ],
)
def test_dockerfile_check_catches(old: str, new: str, expect: str) -> None:
    text, ignore = load_dockerfile()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new, 1), ignore)
    assert any(expect in p for p in problems), problems


def _proxy_container(docs: list[Doc]) -> Doc:
    proxy = _find(docs, "Deployment", "leangate")
    assert proxy is not None
    container: Doc = _pod_spec(proxy)["containers"][0]
    return container


def _k8s_env_typo(docs: list[Doc]) -> None:
    env = _proxy_container(docs)["env"]
    env[0]["name"] = env[0]["name"].replace("BACKEND", "BAKEND")


def _backend_behind_one_service(docs: list[Doc]) -> None:
    for item in _proxy_container(docs)["env"]:
        if item["name"] == "LEANGATE_BACKEND_URL":
            item["value"] = "http://vllm:8000"


def _policy_edited_in_one_place(docs: list[Doc]) -> None:
    config_map = _find(docs, "ConfigMap", "leangate-policy")
    assert config_map is not None
    config_map["data"]["policy.yaml"] += "default_budget_ms: 300\n"


def _policy_by_sub_path(docs: list[Doc]) -> None:
    for mount in _proxy_container(docs)["volumeMounts"]:
        if mount["name"] == "policy":
            mount["subPath"] = "policy.yaml"


def _liveness_on_a_missing_route(docs: list[Doc]) -> None:
    _proxy_container(docs)["livenessProbe"]["httpGet"]["path"] = "/healthz"


def _service_selects_nothing(docs: list[Doc]) -> None:
    service = _find(docs, "Service", "leangate")
    assert service is not None
    service["spec"]["selector"] = {"app.kubernetes.io/name": "leangat"}


def _no_gpu(docs: list[Doc]) -> None:
    vllm = _find(docs, "StatefulSet", "vllm")
    assert vllm is not None
    del _pod_spec(vllm)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


@pytest.mark.parametrize(
    ("break_it", "expect"),
    [
        (_k8s_env_typo, "LEANGATE_BAKEND_URL is not a setting"),
        (_backend_behind_one_service, "LEANGATE_BACKEND_URL"),
        (_policy_edited_in_one_place, "not the text of"),
        (_policy_by_sub_path, "subPath"),
        (_liveness_on_a_missing_route, "livenessProbe"),
        (_service_selects_nothing, "selects no pods"),
        (_no_gpu, "requests no GPU"),
    ],
)
def test_k8s_check_catches(break_it: Callable[[list[Doc]], None], expect: str) -> None:
    docs = copy.deepcopy(load_manifests())
    break_it(docs)
    problems = k8s_problems(docs)
    assert any(expect in p for p in problems), problems


def test_schema_check_catches_a_misspelt_field() -> None:
    docs = copy.deepcopy(load_manifests())
    container = _proxy_container(docs)
    container["readinesProbe"] = container.pop("readinessProbe")
    problems = schema_problems([_find(docs, "Deployment", "leangate") or {}])
    assert any("readinesProbe" in p for p in problems), problems
