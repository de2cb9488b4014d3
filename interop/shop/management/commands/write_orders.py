"""Writes outbox rows as a Django service does: `--decorated` orders saved through the `@publish`
model, `--explicit` rows made with `Published.objects.create` inside `transaction.atomic()`.
Prints the ids of the outbox rows written (the messages' `dop-msg-id`) as a JSON list. With
`--span NAME`, the rows are written inside an OpenTelemetry span of that name (recorded when the
project is instrumented: see interop_project/tracing.py)."""
import contextlib
import datetime
import decimal
import json
import os

from django.core.management.base import BaseCommand
from django.db import transaction
from django_outbox_pattern.models import Published
from opentelemetry import trace

from shop.models import ORDERS_DESTINATION
from shop.models import Order


class Command(BaseCommand):
    def add_arguments(self, parser):
        parser.add_argument("--decorated", type=int, default=0)
        parser.add_argument("--explicit", type=int, default=0)
        parser.add_argument("--headers", default="{}", help="custom headers of the explicit rows (JSON)")
        parser.add_argument("--span", help="write the rows inside an OpenTelemetry span of this name")

    def handle(self, *args, **options):
        before = set(Published.objects.values_list("id", flat=True))
        span = options["span"]
        with trace.get_tracer("shop").start_as_current_span(span) if span else contextlib.nullcontext():
            self.write(options)
        ids = [str(i) for i in Published.objects.values_list("id", flat=True) if i not in before]
        self.stdout.write(json.dumps(ids))

    def write(self, options):
        for n in range(options["decorated"]):
            Order(
                customer=f"customer {n}",
                total=decimal.Decimal("12.50"),
                placed_at=datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone.utc),
            ).save()
        headers = json.loads(options["headers"])
        for n in range(options["explicit"]):
            with transaction.atomic():
                Published.objects.create(
                    destination=os.environ.get("INTEROP_EXPLICIT_DESTINATION", ORDERS_DESTINATION),
                    body={"explicit": n, "text": "w\u00f6rld: colon\\backslash\nnewline"},
                    headers=headers,
                )
