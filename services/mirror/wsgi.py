"""The WSGI entry point for gunicorn: ``services.mirror.wsgi:application``."""

from services.mirror.http import build_app

application = build_app()
