"""Who may call what: the API key (when one is set) for every /v1 call, the admin key for
adapter management, and, on every call, a Host header naming this server.

Management always needs the admin key: where none is given, the server generates one into a
file only its user can read (see cli.py), so a same-host proxy, a port-forward or a web page
that rebinds a name to 127.0.0.1 never manages adapters by reaching the port."""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from fastapi import Request

from ptmoe_serve.api.errors import RequestError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` -> `::1`."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


@dataclass(frozen=True)
class AccessPolicy:
    admin_api_key: str
    api_key: str | None = None
    metrics_need_key: bool = False
    # Host names requests may be addressed to besides loopback ones; None: any.
    allowed_hosts: frozenset[str] | None = frozenset()

    def __post_init__(self):
        if not self.admin_api_key or self.api_key == "" or self.api_key == self.admin_api_key:
            raise ValueError("the admin key must be set, and differ from a non-empty API key")

    def check_host(self, request: Request) -> None:
        """A name other than this server's in the Host header is a browser sent here by a
        name rebound to this address (DNS rebinding), or a proxy not yet allowed."""
        name = host_name(request.headers.get("host", "")).lower()
        if (self.allowed_hosts is None or is_loopback(name) or name in self.allowed_hosts
                or "*" in self.allowed_hosts):
            return
        raise RequestError(400, f"this server does not answer to the host name {name!r}; "
                                "if it is the server's own name (a proxy in front, a DNS "
                                "name), start the server with --allowed-host " + (name or "NAME"),
                           code="invalid_host")

    def check_api(self, request: Request) -> None:
        if self.api_key is None:
            return
        if not self._presented(request, self.api_key, self.admin_api_key):
            raise RequestError(401, "a valid API key is required: send 'Authorization: Bearer "
                                    "<key>'", code="invalid_api_key")

    def check_admin(self, request: Request) -> None:
        if not self._presented(request, self.admin_api_key):
            raise RequestError(401, "adapter management needs the admin key: send "
                                    "'Authorization: Bearer <admin key>' (the server's log "
                                    "names the file it is in unless --admin-api-key was "
                                    "given)", code="invalid_api_key")

    def allows_admin(self, request: Request) -> bool:
        try:
            self.check_admin(request)
        except RequestError:
            return False
        return True

    @staticmethod
    def _presented(request: Request, *keys: str | None) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return any(key and hmac.compare_digest(token.strip().encode(), key.encode())
                   for key in keys)


def require_admin(request: Request) -> None:
    """A route dependency: the admin key, before the route reads its body."""
    request.app.state.access.check_admin(request)
