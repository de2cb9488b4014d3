"""Writes outbox rows as a Django service does: `--decorated` orders saved through the `@publish`
model, `--explicit` rows made with `Published.objects.create` inside `transaction.atomic()`.
Prints the ids of the outbox rows written (the messages' `dop-msg-id`) as a JSON list."""
import datetime
import decimal
import json
import os

from django.core.management.base import BaseCommand
from django.db import transaction
from django_outbox_pattern.models import Published

from shop.models import ORDERS_DESTINATION
from shop.models import Order


class Command(BaseCommand):
    def add_arguments(self, parser):
        parser.add_argument("--decorated", type=int, default=0)
        parser.add_argument("--explicit", type=int, default=0)
        parser.add_argument("--headers", default="{}", help="custom headers of the explicit rows (JSON)")

    def handle(self, *args, **options):
        before = set(Published.objects.values_list("id", flat=True))
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
        ids = [str(i) for i in Published.objects.values_list("id", flat=True) if i not in before]
        self.stdout.write(json.dumps(ids))
