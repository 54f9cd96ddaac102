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


def test_allows_admin_answers_what_check_admin_decides():
    policy = AccessPolicy(api_key="user", admin_api_key="admin")
    assert policy.allows_admin(request("admin"))
    assert not policy.allows_admin(request("user")) and not policy.allows_admin(request())
    assert AccessPolicy(loopback_only=True).allows_admin(request())
    assert not AccessPolicy(loopback_only=False).allows_admin(request())


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


@pytest.fixture
def key_files(tmp_path):
    (tmp_path / "api.key").write_text("user-key\n")
    (tmp_path / "empty.key").write_text("\n")
    return tmp_path


@pytest.mark.parametrize("argv, env, message", [
    (["--api-key", ""], {}, "--api-key is empty"),
    ([], {"PTMOE_API_KEY": ""}, "--api-key is empty"),
    (["--api-key", "user", "--admin-api-key", ""], {}, "--admin-api-key is empty"),
    ([], {"PTMOE_ADMIN_API_KEY": ""}, "--admin-api-key is empty"),
    (["--api-key-file", "{dir}/empty.key"], {}, "--api-key is empty"),
    (["--api-key-file", "{dir}/missing.key"], {}, "cannot read --api-key-file"),
    (["--api-key", "user", "--api-key-file", "{dir}/api.key"], {}, "not two of them"),
    (["--api-key-file", "{dir}/api.key"], {"PTMOE_API_KEY": "user"}, "not two of them"),
    (["--api-key", " user"], {}, "whitespace"),
    (["--api-key", "same", "--admin-api-key", "same"], {}, "must differ from the API key"),
    (["--api-key-file", "{dir}/api.key"], {"PTMOE_ADMIN_API_KEY": "user-key"},
     "must differ from the API key"),
])
def test_start_up_refuses_keys_that_would_weaken_access(key_files, argv, env, message):
    """`ptmoe-serve serve` as users run it: refused in well under a second, before the model
    or vLLM is touched, with a message that names the option."""
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith("PTMOE_")}
    done = subprocess.run(
        [sys.executable, "-m", "ptmoe_serve.cli", "serve", "--model", "default",
         *(a.format(dir=key_files) for a in argv)],
        env={**environ, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_keys_are_read_from_files_without_their_newline(key_files):
    from argparse import Namespace

    from ptmoe_serve.cli import _keys

    (key_files / "admin.key").write_text("admin-key\n")
    args = Namespace(api_key=None, api_key_file=key_files / "api.key", admin_api_key=None,
                     admin_api_key_file=key_files / "admin.key")
    assert _keys(args) == ("user-key", "admin-key")
    assert _keys(Namespace(api_key=None, api_key_file=None, admin_api_key=None,
                           admin_api_key_file=None)) == (None, None)
