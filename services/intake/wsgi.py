"""The WSGI entry point for gunicorn: ``services.intake.wsgi:application``."""

from services.intake.service import build_app
from services.intake.wire import canonical_headers

application = canonical_headers(build_app())
