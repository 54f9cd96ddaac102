import pytest
from starlette.requests import Request

from ptmoe_serve.api.auth import AccessPolicy, host_name, is_loopback
from ptmoe_serve.api.errors import RequestError


def request(token: str | None = None, host: str = "127.0.0.1:8000") -> Request:
    headers = [(b"host", host.encode())]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
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
    assert status(AccessPolicy(admin_api_key="admin").check_api, request()) == 200


@pytest.mark.parametrize("api_key", ["user", None])
def test_management_needs_the_admin_key_whatever_else_is_set(api_key):
    """No key, the API key, a wrong key, an empty Bearer: 401; only the admin key manages."""
    policy = AccessPolicy(api_key=api_key, admin_api_key="admin")
    for token in (None, "user", "wrong", " "):
        assert status(policy.check_admin, request(token)) == 401
        assert not policy.allows_admin(request(token))
    assert status(policy.check_admin, request("admin")) == 200
    assert policy.allows_admin(request("admin"))


@pytest.mark.parametrize("admin, api", [("", None), (None, None), ("same", "same"), ("a", "")])
def test_a_policy_without_a_distinct_admin_key_cannot_be_built(admin, api):
    with pytest.raises(ValueError):
        AccessPolicy(admin_api_key=admin, api_key=api)


@pytest.mark.parametrize("allowed, host, expected", [
    (frozenset(), "127.0.0.1:8000", 200), (frozenset(), "localhost:8000", 200),
    (frozenset(), "[::1]:8000", 200), (frozenset(), "localhost", 200),
    (frozenset(), "rebind.attacker.example:8000", 400), (frozenset(), "", 400),
    (frozenset({"llm.internal"}), "llm.internal:443", 200),
    (frozenset({"llm.internal"}), "other.example", 400),
    (frozenset({"*"}), "other.example", 200), (None, "other.example", 200)])
def test_host_header(allowed, host, expected):
    policy = AccessPolicy(admin_api_key="admin", allowed_hosts=allowed)
    assert status(policy.check_host, request(host=host)) == expected


def test_host_names():
    assert [host_name(h) for h in ("a:1", "a", "[::1]:80", "[::1]", "::1")] == \
        ["a", "a", "::1", "::1", "::1"]


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
    from ptmoe_serve.api.auth import given_keys
    from ptmoe_serve.config import ServeOptions

    (key_files / "admin.key").write_text("admin-key\n")
    options = ServeOptions(api_key_file=key_files / "api.key",
                           admin_api_key_file=key_files / "admin.key")
    assert given_keys(options, environ={}) == ("user-key", "admin-key")
    assert given_keys(ServeOptions(), environ={}) == (None, None)
    assert given_keys(ServeOptions(), environ={"PTMOE_API_KEY": "k"}) == ("k", None)


def test_the_generated_admin_key_is_private_and_kept(tmp_path):
    from ptmoe_serve.api.auth import AccessSetupError, generated_admin_key

    path = tmp_path / "cache" / "admin.key"
    key = generated_admin_key(path)
    assert len(key) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert generated_admin_key(path) == key  # later starts keep it: scripts keep working
    assert list(path.parent.iterdir()) == [path]
    path.chmod(0o644)
    with pytest.raises(AccessSetupError, match="chmod 600"):
        generated_admin_key(path)


def test_a_public_address_without_an_api_key_is_refused_unless_asked_for():
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith("PTMOE_")}
    done = subprocess.run(
        [sys.executable, "-m", "ptmoe_serve.cli", "serve", "--host", "0.0.0.0"],
        env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "without --api-key" in done.stderr and "--allow-unauthenticated" in done.stderr
