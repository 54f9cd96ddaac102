import pytest
from starlette.requests import Request

from ptmoe_serve.auth import AccessPolicy, is_loopback
from ptmoe_serve.errors import RequestError


def request(token: str | None = None) -> Request:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return Request({"type": "http", "headers": headers})


def status(check, req) -> int:
    try:
        check(req)
    except RequestError as e:
        return e.status
    return 200


def test_api_key():
    policy = AccessPolicy(api_key="user", admin_api_key="admin")
    assert status(policy.check_api, request()) == 401
    assert status(policy.check_api, request("wrong")) == 401
    assert status(policy.check_api, request("user")) == 200
    assert status(policy.check_api, request("admin")) == 200
    assert status(AccessPolicy().check_api, request()) == 200


def test_admin_key():
    policy = AccessPolicy(api_key="user", admin_api_key="admin", loopback_only=False)
    assert status(policy.check_admin, request("user")) == 401
    assert status(policy.check_admin, request("admin")) == 200


@pytest.mark.parametrize("loopback, token, expected", [
    (True, None, 401), (True, "user", 200), (False, "user", 403)])
def test_management_without_admin_key_only_on_loopback(loopback, token, expected):
    policy = AccessPolicy(api_key="user", loopback_only=loopback)
    assert status(policy.check_admin, request(token)) == expected


def test_loopback_hosts():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")
