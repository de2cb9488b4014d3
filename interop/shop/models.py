"""The models of the cross-language tests.

`Order` publishes through the library's decorator, as a Django service does. `Effect` is what a
consumer callback leaves: one row per processed message, deliberately without a unique key, so
that a message processed twice shows up as two rows. `Sample` holds one column of each type whose
body encoding the tests compare; it is never saved.
"""
import os

from django.db import models
from django_outbox_pattern.decorators import Config
from django_outbox_pattern.decorators import publish

ORDERS_DESTINATION = os.environ.get("INTEROP_DESTINATION", "/topic/interop_orders")


@publish([Config(destination=ORDERS_DESTINATION)])
class Order(models.Model):
    customer = models.CharField(max_length=100)
    total = models.DecimalField(max_digits=12, decimal_places=2)
    placed_at = models.DateTimeField()


class Effect(models.Model):
    msg_id = models.CharField(max_length=100, null=True)
    destination = models.CharField(max_length=255)
    body = models.JSONField(null=True)


class Sample(models.Model):
    # Named otherwise than `id`: the body carries it under "id" alone.
    sample_id = models.BigIntegerField(primary_key=True)
    created = models.DateTimeField(null=True)
    # A date-time given with an offset (converted to UTC, as the database gives it back).
    shifted = models.DateTimeField(null=True)
    # A date-time without a zone (a `timestamp without time zone` column).
    naive = models.DateTimeField(null=True)
    day = models.DateField(null=True)
    at = models.TimeField(null=True)
    ref = models.UUIDField(null=True)
    doc = models.JSONField(null=True)
    note = models.CharField(max_length=100, null=True)
    count = models.IntegerField(null=True)
    flag = models.BooleanField(null=True)
    ratio = models.FloatField(null=True)
    price = models.DecimalField(max_digits=10, decimal_places=2, null=True)

    class Meta:
        managed = False
