"""Who is asking: the client's address, believing forwarded headers only from our proxies."""

from __future__ import annotations

import ipaddress

import falcon

from services.intake.errors import Refusal


def _trusted(address: str, trusted: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(net, strict=False) for net in trusted)


def client_address(req: falcon.Request, trusted: tuple[str, ...]) -> str:
    """The address of the client: the peer, or, when the peer is a trusted proxy, the
    nearest address in ``X-Forwarded-For`` that is not one of ours."""
    peer = req.remote_addr or "unknown"
    if not trusted or not _trusted(peer, trusted):
        return peer
    forwarded = req.get_header("X-Forwarded-For") or ""
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop[:64]
    return hops[0][:64] if hops else peer


def is_https(req: falcon.Request, trusted: tuple[str, ...]) -> bool:
    """Whether the client reached us over HTTPS (as a trusted proxy tells, if there is one)."""
    peer = req.remote_addr or ""
    if trusted and _trusted(peer, trusted):
        proto = (req.get_header("X-Forwarded-Proto") or "").split(",")[0].strip().lower()
        if proto:
            return proto == "https"
    return req.scheme == "https"


# Load balancers probe these over plain HTTP inside the network.
HTTPS_EXEMPT = ("/__lbheartbeat__", "/__heartbeat__")


class RequireHttps:
    """Middleware: refuse plain-HTTP requests with 403, as the original server did."""

    def __init__(self, trusted: tuple[str, ...]) -> None:
        self._trusted = trusted

    def process_request(self, req: falcon.Request, _resp: falcon.Response) -> None:
        if req.path in HTTPS_EXEMPT or is_https(req, self._trusted):
            return
        raise Refusal(403, "this server answers over HTTPS only", code="https")
