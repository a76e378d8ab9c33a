"""What can go wrong, each with the exit code the command line returns for it."""

from __future__ import annotations

# Exit codes of retrace-client, documented in its --help and the README.
EXIT_OK = 0
EXIT_RETRACE_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_UNAVAILABLE = 4
EXIT_PENDING = 5


class ClientError(Exception):
    """A failure the user can act on; ``exit_code`` tells its kind."""

    exit_code = EXIT_USAGE


class Refused(ClientError):
    """The server refused the request (a 4xx answer), or the client refused early."""

    exit_code = EXIT_REFUSED


class Unavailable(ClientError):
    """The server could not be reached or failed (a 5xx answer, a network error)."""

    exit_code = EXIT_UNAVAILABLE
