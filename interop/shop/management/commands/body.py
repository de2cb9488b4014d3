"""Prints the body the library's `@publish` writes for a `Sample` holding given values.

Reads a JSON object from stdin: {"fields": null or [names], "values": {column: value}}. Each
value goes through its field's `to_python`, as a value a form or a database gives a model would
(an ISO string becomes a datetime, a string a Decimal or UUID). An aware datetime is converted to
UTC first, as the instance reloaded from the database holds it. The body is then made by the
library's own serializer function, the one its decorator calls."""
import datetime
import json
import sys

from django.core.management.base import BaseCommand
from django.db import models
from django_outbox_pattern.decorators import _serializer

from shop.models import Sample


class Command(BaseCommand):
    def handle(self, *args, **options):
        request = json.load(sys.stdin)
        sample = Sample()
        for name, raw in request["values"].items():
            field = Sample._meta.get_field(name)
            value = raw if isinstance(field, models.JSONField) else field.to_python(raw)
            if isinstance(value, datetime.datetime) and value.tzinfo is not None:
                value = value.astimezone(datetime.timezone.utc)
            setattr(sample, field.attname, value)
        self.stdout.write(json.dumps(_serializer(sample, request.get("fields"))))
