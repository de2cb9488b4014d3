"""Settings of the cross-language test project.

Everything a test varies comes from the environment, so that each test has its own database and
its own destinations on the shared broker:

* INTEROP_DB_NAME: the PostgreSQL database (on INTEROP_DB_HOST:INTEROP_DB_PORT, user postgres);
* INTEROP_DESTINATION: the destination the `@publish` model announces to (read when the model
  module is imported);
* INTEROP_STOMP_PORT: the STOMP port (61613; a test points it at a recording proxy).
* INTEROP_SPANS: a file; when set, manage.py instruments django-outbox-pattern with
  OpenTelemetry and appends every finished span to it (interop_project/tracing.py).
"""
import os

SECRET_KEY = "interop-tests-only"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django_outbox_pattern",
    "shop",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("INTEROP_DB_NAME", "test"),
        "USER": os.environ.get("INTEROP_DB_USER", "postgres"),
        "HOST": os.environ.get("INTEROP_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("INTEROP_DB_PORT", "5432"),
        # Persistent connections for the benchmark (outbox-bench consume); 0 otherwise.
        "CONN_MAX_AGE": int(os.environ.get("INTEROP_CONN_MAX_AGE", "0")),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DJANGO_OUTBOX_PATTERN = {
    "DEFAULT_STOMP_HOST_AND_PORTS": [
        ("127.0.0.1", int(os.environ.get("INTEROP_STOMP_PORT", "61613")))
    ],
    "DEFAULT_STOMP_USERNAME": "guest",
    "DEFAULT_STOMP_PASSCODE": "guest",
    "DEFAULT_PRODUCER_WAITING_TIME": 1,
    "DEFAULT_CONSUMER_SHUTDOWN_TIMEOUT": 5,
}
LOGGING = {
    "version": 1,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"django_outbox_pattern": {"handlers": ["stderr"], "level": "INFO"}},
}
