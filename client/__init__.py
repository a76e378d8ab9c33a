"""retrace-client: send a crash to a Retrace Server and fetch its backtrace.

Needs nothing but the Python standard library, so it installs anywhere
(``pip install 'retrace-server[client]'``).
"""
