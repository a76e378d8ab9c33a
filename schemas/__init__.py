"""Message schemas and the bus topology shared by every Retrace Server service.

A distribution of its own, ``retrace-server-messages`` (schemas/pyproject.toml), so that
a consumer of our messages installs it without the server.
"""
