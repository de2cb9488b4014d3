"""The consumer callback of the README of django-outbox-pattern: the business write and the inbox
row in one transaction."""
from django.db import transaction

from shop.models import Effect


def record(payload):
    with transaction.atomic():
        Effect.objects.create(
            msg_id=payload.headers.get("dop-msg-id"),
            destination=payload.headers.get("destination", ""),
            body=payload.body,
        )
        payload.save()
