"""Prometheus metrics, one registry per app so that several apps can share a process."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from leangate.backend.balancer import Replica

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._request_children: dict[tuple[str, int, str, str], tuple[Counter, Histogram]] = {}
        self._replica_children: dict[str, Counter] = {}
        r = self.registry
        self.requests = Counter(
            "leangate_requests",
            "Requests answered",
            ["route", "status", "model", "tenant"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "leangate_request_seconds",
            "Time to the response headers",
            ["route", "model", "tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_event_seconds = Histogram(
            "leangate_first_event_seconds",
            "Streams: time from the request to its first event (the client's time to first "
            "token, give or take the role-only first chunk)",
            ["route", "model", "tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "leangate_stage_seconds",
            "A stage's own time, excluding the rest of the chain",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.failed_open = Counter(
            "leangate_stage_failed_open",
            "Stages that failed or overran their budget and were skipped",
            ["stage", "reason"],
            registry=r,
        )
        self.stream_errors = Counter(
            "leangate_stream_errors", "Streams ended by an error event", ["route"], registry=r
        )
        self.policy_reloads = Counter(
            "leangate_policy_reloads", "Policy file reloads", ["outcome"], registry=r
        )
        self.limited = Counter(
            "leangate_limited",
            "Requests refused by a per-tenant limit, by the limit",
            ["limit"],
            registry=r,
        )
        self.limit_store_failures = Counter(
            "leangate_limit_store_failures",
            "Limit checks skipped because the limit store failed (the request was admitted)",
            registry=r,
        )
        self.backend_requests = Counter(
            "leangate_backend_requests",
            "Requests sent to backend replicas",
            ["replica"],
            registry=r,
        )
        self.backend_ready = Gauge(
            "leangate_backend_replicas_healthy", "Healthy backend replicas", registry=r
        )
        self.backend_outstanding = Gauge(
            "leangate_backend_outstanding",
            "Requests sent to a replica and not yet answered in full (what the balancer "
            "weighs), as of the scrape",
            ["replica"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "leangate_cache_lookups", "Result cache lookups", ["kind", "outcome"], registry=r
        )
        self.cache_errors = Counter(
            "leangate_cache_errors", "Result cache store failures", ["operation"], registry=r
        )
        self.planner_decisions = Counter(
            "leangate_planner_decisions",
            "Planner decisions: plan (outline, decompose) or answer directly, and why",
            ["stage", "decision", "reason"],
            registry=r,
        )
        self.planner_seconds = Histogram(
            "leangate_planner_seconds",
            "Planned requests: the cost model's predicted time and the actual time",
            ["stage", "kind"],
            buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.compress_decisions = Counter(
            "leangate_compress_decisions",
            "Compression decisions: compress or skip, and why",
            ["stage", "decision", "reason"],
            registry=r,
        )
        self.compress_tokens = Counter(
            "leangate_compress_tokens",
            "Prompt tokens of compressed requests, before and after compression",
            ["stage", "kind"],
            registry=r,
        )
        self.compress_seconds = Histogram(
            "leangate_compress_seconds",
            "The compressor's own time per compressed request",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rag_selections = Counter(
            "leangate_rag_selections",
            "RAG context selections, by outcome (selected, within-budget, failed-open-*)",
            ["stage", "outcome"],
            registry=r,
        )
        self.rag_tokens = Counter(
            "leangate_rag_tokens",
            "Context tokens offered to RAG selection and sent on",
            ["stage", "kind"],
            registry=r,
        )
        self.rag_seconds = Histogram(
            "leangate_rag_seconds",
            "The RAG stage's own time per request (search and selection)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rag_events = Counter(
            "leangate_rag_events",
            "RAG problems that did not fail the request (an unknown corpus)",
            ["stage", "event"],
            registry=r,
        )
        self.saved_seconds = Counter(
            "leangate_stage_saved_seconds",
            "Backend time a stage saved, estimated by the backend profile (uncalibrated: at "
            "a fast assumed prefill speed): shorter prompts less the stage's own time "
            "(compress, rag), answers from the cache, SoT against its predicted direct answer",
            ["stage"],
            registry=r,
        )
        self.subrequests = Counter(
            "leangate_subrequests",
            "Backend calls stages made on behalf of a request",
            ["stage", "kind", "outcome"],
            registry=r,
        )
        self.subrequest_tokens = Counter(
            "leangate_subrequest_tokens",
            "Tokens of the backend calls stages made on behalf of a request",
            ["stage", "type"],
            registry=r,
        )

    def cache_lookup_counts(self) -> dict[str, int]:
        """This process's result-cache lookups since it started, as ``kind-outcome``."""
        return {
            f"{s.labels['kind']}-{s.labels['outcome']}": int(s.value)
            for metric in self.cache_lookups.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        }

    def stage_timed(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def stage_failed_open(self, stage: str, reason: str) -> None:
        self.failed_open.labels(stage, reason).inc()

    def planner_decided(self, stage: str, run: bool, reason: str) -> None:
        self.planner_decisions.labels(stage, "plan" if run else "direct", reason).inc()

    def planner_timed(self, stage: str, predicted_s: float, actual_s: float) -> None:
        """A planned request's predicted and actual time (predicted 0: forced, none made)."""
        if predicted_s > 0:
            self.planner_seconds.labels(stage, "predicted").observe(predicted_s)
        self.planner_seconds.labels(stage, "actual").observe(actual_s)

    def compress_decided(self, stage: str, run: bool, reason: str) -> None:
        self.compress_decisions.labels(stage, "compress" if run else "skip", reason).inc()

    def compress_done(self, stage: str, before: int, after: int, seconds: float) -> None:
        self.compress_tokens.labels(stage, "before").inc(before)
        self.compress_tokens.labels(stage, "after").inc(after)
        self.compress_seconds.labels(stage).observe(seconds)

    def rag_done(self, stage: str, outcome: str, before: int, after: int, seconds: float) -> None:
        self.rag_selections.labels(stage, outcome).inc()
        self.rag_tokens.labels(stage, "offered").inc(before)
        self.rag_tokens.labels(stage, "sent").inc(after)
        self.rag_seconds.labels(stage).observe(seconds)

    def stage_saved(self, stage: str, seconds: float) -> None:
        """Estimated seconds saved (a loss, when negative, is counted as none)."""
        self.saved_seconds.labels(stage).inc(max(seconds, 0.0))

    def rag_event(self, stage: str, event: str) -> None:
        self.rag_events.labels(stage, event).inc()

    def subrequest_done(self, stage: str, kind: str, outcome: str, usage: object) -> None:
        self.subrequests.labels(stage, kind, outcome).inc()
        if isinstance(usage, dict):
            for field in ("prompt_tokens", "completion_tokens"):
                count = usage.get(field)
                if isinstance(count, int) and count > 0:
                    self.subrequest_tokens.labels(stage, field.removesuffix("_tokens")).inc(count)

    def request_done(
        self, route: str, status: int, seconds: float, model: str = "", tenant: str = ""
    ) -> None:
        """Count an answered request; label children are cached (the hot path). ``model``
        and ``tenant`` are empty for a request refused before they were known; ``tenant``
        must be a bounded label (``Gateway.tenant_label``)."""
        key = (route, status, model, tenant)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, str(status), model, tenant),
                self.request_seconds.labels(route, model, tenant),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def first_event(self, route: str, model: str, tenant: str, seconds: float) -> None:
        self.first_event_seconds.labels(route, model, tenant).observe(seconds)

    def backend_request_sent(self, replica: str) -> None:
        child = self._replica_children.get(replica)
        if child is None:
            child = self._replica_children[replica] = self.backend_requests.labels(replica)
        child.inc()

    def backend_state(self, replicas: Iterable[Replica]) -> None:
        """Healthy replicas and each one's outstanding requests, read when scraped."""
        healthy = 0
        for replica in replicas:
            healthy += replica.healthy
            self.backend_outstanding.labels(replica.url).set(replica.outstanding)
        self.backend_ready.set(healthy)

    def render(self) -> bytes:
        return generate_latest(self.registry)
