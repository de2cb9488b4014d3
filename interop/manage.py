#!/usr/bin/env python
"""The Django project the cross-language tests run: django-outbox-pattern on PostgreSQL."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "interop_project.settings")
    from interop_project.tracing import instrument

    instrument()
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
