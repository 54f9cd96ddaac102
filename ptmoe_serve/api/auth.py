"""Who may call what: the API key (when one is set) for every /v1 call, the admin key for
adapter management, and, on every call, a Host header naming this server.

Management always needs the admin key: where none is given, the server generates one into a
file only its user can read (`generated_admin_key`), so a same-host proxy, a port-forward or a
web page that rebinds a name to 127.0.0.1 never manages adapters by reaching the port.

`access_policy` makes the policy from the serving options at start-up, refusing what would
quietly weaken access."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from ptmoe_serve.api.errors import RequestError
from ptmoe_serve.config import ServeOptions
from ptmoe_serve.disk import write_atomically

logger = logging.getLogger(__name__)
# Where a key may come from besides its option and its file.
KEY_VARIABLES = {"api_key": "PTMOE_API_KEY", "admin_api_key": "PTMOE_ADMIN_API_KEY"}


class AccessSetupError(ValueError):
    """Options that would leave the server open, or keys that cannot be used: the server does
    not start."""


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


def access_policy(options: ServeOptions, keys: tuple[str | None, str | None],
                  host: str | None, key_file: Path) -> AccessPolicy:
    """The policy for the keys given (`given_keys`), with the admin key from `key_file` where
    none was, and the host names answered by a server listening on `host`."""
    api_key, admin_api_key = keys
    hosts = allowed_hosts(options, host, api_key)
    if admin_api_key is None:
        admin_api_key = generated_admin_key(key_file)
        if admin_api_key == api_key:
            raise AccessSetupError(f"{key_file} holds the API key; the admin key must differ")
        logger.info("adapter management needs the admin key in %s (give --admin-api-key-file "
                    "to choose one)", key_file)
    return AccessPolicy(admin_api_key, api_key, options.metrics_need_key, hosts)


def given_keys(options: ServeOptions, environ: Mapping[str, str] = os.environ
               ) -> tuple[str | None, str | None]:
    """The API and admin keys, from options, files or the environment. Refuses an empty key (an
    empty variable included), a key with surrounding whitespace (no client could send it), one
    key given two ways, the same key for both."""
    keys = []
    for name, variable in KEY_VARIABLES.items():
        flag = "--" + name.replace("_", "-")
        key, path = getattr(options, name), getattr(options, f"{name}_file")
        if key is None:
            key = environ.get(variable)
        if path is not None:
            if key is not None:
                raise AccessSetupError(f"give {flag} or {flag}-file (or ${variable}), not two "
                                       "of them")
            try:
                key = path.read_text().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise AccessSetupError(f"cannot read {flag}-file {path}: {e}") from None
        if key is not None and not key:
            raise AccessSetupError(f"{flag} is empty (from the option, its file or ${variable}); "
                                   "give a key, or unset it to run without one")
        if key is not None and key != key.strip():
            raise AccessSetupError(f"{flag} starts or ends with whitespace")
        keys.append(key)
    api_key, admin_api_key = keys
    if admin_api_key is not None and admin_api_key == api_key:
        raise AccessSetupError("the admin key must differ from the API key: every caller holds "
                               "the API key")
    return api_key, admin_api_key


def generated_admin_key(path: Path) -> str:
    """The admin key in `path`, generated there the first time (readable by this user only),
    as notebook servers keep their tokens: management needs a key even where none is given."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        old_mask = os.umask(0o077)
        try:  # exclusive: two servers starting at once agree on one key
            write_atomically(path, (secrets.token_urlsafe(32) + "\n").encode(), exclusive=True)
        except FileExistsError:
            pass
        finally:
            os.umask(old_mask)
    if path.stat().st_mode & 0o077:
        raise AccessSetupError(f"{path} (the generated admin key) can be read by other users; "
                               "chmod 600 it, or remove it to generate a new key")
    key = path.read_text().strip()
    if not key:
        raise AccessSetupError(f"{path} is empty; remove it to generate a new key")
    return key


def allowed_hosts(options: ServeOptions, host: str | None, api_key: str | None
                  ) -> frozenset[str] | None:
    """The Host names answered besides loopback ones (None: any). Unauthenticated inference on
    a public address is refused unless asked for."""
    loopback = host is not None and is_loopback(host)
    if not loopback and api_key is None and not options.allow_unauthenticated:
        raise AccessSetupError(
            f"listening on {host or 'every address'} without --api-key would let anyone who "
            "reaches the port use the model; give --api-key (or --api-key-file, "
            "$PTMOE_API_KEY), or --allow-unauthenticated if a gateway in front checks callers")
    if options.allowed_host:
        return frozenset(name.lower() for name in options.allowed_host)
    return frozenset() if loopback else None
