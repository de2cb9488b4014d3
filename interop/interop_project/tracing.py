"""OpenTelemetry for the cross-language trace tests, on when INTEROP_SPANS names a file.

The project is then instrumented as the README of opentelemetry-instrumentation-django-outbox-pattern
says, from manage.py before Django sets up (the library's `Published.save` holds its own reference
to `get_message_headers`, bound when its models module is imported: the instrumentor must wrap it
first). Every finished span is appended to INTEROP_SPANS as one JSON object a line, exported as
it ends (no batching: a process stopped by a signal has written all its spans).
"""
import json
import os
import threading

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult


class JsonLinesExporter(SpanExporter):
    """Appends each span's name, kind, ids and parent to a file, one JSON object a line."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()

    def export(self, spans):
        lines = []
        for span in spans:
            parent = span.parent
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "kind": span.kind.name,
                        "trace_id": format(span.context.trace_id, "032x"),
                        "span_id": format(span.context.span_id, "016x"),
                        "parent_span_id": format(parent.span_id, "016x") if parent else None,
                        "parent_is_remote": parent.is_remote if parent else None,
                        "pid": os.getpid(),
                    }
                )
            )
        with self.lock, open(self.path, "a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


def instrument():
    """Instruments django-outbox-pattern if INTEROP_SPANS is set; call before django.setup()."""
    path = os.environ.get("INTEROP_SPANS")
    if not path:
        return
    from opentelemetry_instrumentation_django_outbox_pattern import DjangoOutboxPatternInstrumentor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    trace.set_tracer_provider(provider)
    DjangoOutboxPatternInstrumentor().instrument(tracer_provider=provider)
