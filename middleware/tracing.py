"""OpenTelemetry spans for requests, stages and backend calls: optional, off by default.

With ``LEANGATE_OTEL=true`` (and the ``otel`` extra installed) each request gets a span,
each stage that runs a child span, and each call to the backend a grandchild, exported over
OTLP/HTTP as the OpenTelemetry SDK's own variables say (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``, ...). Spans carry route, model, bounded tenant, stage and replica
names, never prompt or answer text. Off, nothing of OpenTelemetry is imported and requests
pay nothing.

The tracer provider is the app's own, not the process-wide one, so that two apps (or an
app and an SDK pipeline) in one process keep their spans apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leangate.middleware.context import RequestContext, Result

Attributes = Mapping[str, str | int | float | bool]
Handler = Callable[["RequestContext"], Awaitable["Result"]]


class Tracing:
    def __init__(self, provider: Any) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("leangate")

    @classmethod
    def start(cls, exporter: Any | None = None) -> Tracing:
        """Spans exported by ``exporter`` (default: OTLP over HTTP), in batches."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": "leangate"}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    @contextlib.contextmanager
    def span(self, name: str, attributes: Attributes) -> Iterator[Any]:
        with self._tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def backend_calls(self, endpoint: Handler) -> Handler:
        """``endpoint`` (the call to the backend) with a span per call, until the answer's
        headers (a stream's events are the parent's)."""

        async def traced(ctx: RequestContext) -> Result:
            attributes: Attributes = {"leangate.model": ctx.model, "leangate.stream": ctx.stream}
            with self.span("leangate.backend", attributes):
                return await endpoint(ctx)

        return traced

    def note(self, name: str, attributes: Attributes) -> None:
        """An event on the current span (a stage that failed open, say)."""
        from opentelemetry import trace

        trace.get_current_span().add_event(name, attributes=attributes)

    def shutdown(self) -> None:
        """Export what is buffered and stop."""
        self._provider.shutdown()
