"""Who may call what: an API key for every /v1 call, an admin key for adapter management.

Without an admin key, management is open only to a server that listens on loopback alone,
where only this machine's users can reach it."""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from fastapi import Request

from ptmoe_serve.errors import RequestError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AccessPolicy:
    api_key: str | None = None
    admin_api_key: str | None = None
    loopback_only: bool = True
    metrics_need_key: bool = False

    def check_api(self, request: Request) -> None:
        if self.api_key is None:
            return
        if not self._presented(request, self.api_key, self.admin_api_key):
            raise RequestError(401, "a valid API key is required: send 'Authorization: Bearer "
                                    "<key>'", code="invalid_api_key")

    def check_admin(self, request: Request) -> None:
        if self.admin_api_key is None:
            if not self.loopback_only:
                raise RequestError(403, "adapter management is disabled: start the server "
                                        "with --admin-api-key, or listen on loopback only",
                                   code="management_disabled")
            self.check_api(request)
        elif not self._presented(request, self.admin_api_key):
            raise RequestError(401, "adapter management needs the admin API key: send "
                                    "'Authorization: Bearer <admin key>'", code="invalid_api_key")

    def allows_admin(self, request: Request) -> bool:
        try:
            self.check_admin(request)
        except RequestError:
            return False
        return True

    def check_metrics(self, request: Request) -> None:
        if self.metrics_need_key:
            self.check_api(request)

    @staticmethod
    def _presented(request: Request, *keys: str | None) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return any(key is not None and hmac.compare_digest(token.strip().encode(), key.encode())
                   for key in keys)
