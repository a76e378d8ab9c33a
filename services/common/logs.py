"""Logging set-up shared by every service's entry point."""

import logging
import os


def setup_logging() -> None:
    """Log to stderr at ``RETRACE_LOG_LEVEL`` (default INFO), one line a record."""
    logging.basicConfig(
        level=os.environ.get("RETRACE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    for noisy in ("pika", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
