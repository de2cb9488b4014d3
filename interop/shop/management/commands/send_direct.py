"""Sends a message directly (`factory_producer().send_event`, no outbox row) `--count` times, each
with the same `dop-msg-id`."""
from django.core.management.base import BaseCommand
from django_outbox_pattern.factories import factory_producer


class Command(BaseCommand):
    def add_arguments(self, parser):
        parser.add_argument("destination")
        parser.add_argument("msg_id")
        parser.add_argument("--count", type=int, default=1)

    def handle(self, *args, **options):
        with factory_producer() as producer:
            for n in range(options["count"]):
                producer.send_event(
                    body={"direct": True, "copy": n},
                    destination=options["destination"],
                    headers={"dop-msg-id": options["msg_id"]},
                )
