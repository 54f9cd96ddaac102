"""Serving's options: `ptmoe-serve serve` takes each flag, its default and its bounds from
`ServeOptions`, and hands the settings start-up derives from them to the server."""

import pytest

from ptmoe_serve.cli import main
from ptmoe_serve.config import ServeOptions


@pytest.fixture
def started(monkeypatch, tmp_path):
    """What `serve` would start the server with: (settings, access policy)."""
    for variable in ("PTMOE_API_KEY", "PTMOE_ADMIN_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    seen = []
    monkeypatch.setattr("ptmoe_serve.api.server.serve", lambda *given: seen.append(given))
    return seen


def test_serve_builds_its_settings_from_the_options(started, model_dir, tmp_path):
    main(["serve", "--model", str(model_dir), "--cache-dir", str(tmp_path),
          "--adapters", str(tmp_path / "store"), "--pin", "a", "--pin", "b",
          "--no-fine-tune-worker", "--max-upload-mb", "1.5", "--allowed-host", "Example.COM",
          "--max-model-len", "512"])
    (settings, access), = started
    assert settings.options == ServeOptions(
        adapters=tmp_path / "store", pin=("a", "b"), fine_tune_worker=False, max_upload_mb=1.5,
        allowed_host=("Example.COM",))
    assert settings.options.max_upload_bytes == 1536 * 1024
    assert settings.adapters_dir == (tmp_path / "store").resolve()
    assert settings.engine.routing_in_engine and settings.engine.max_soft_prompt_length == 128
    assert settings.vllm_args.max_model_len == 512 and settings.vllm_args.host == "127.0.0.1"
    # No admin key given: one generated into the cache folder.
    assert access.admin_api_key == (tmp_path / "admin.key").read_text().strip()
    assert access.allowed_hosts == {"example.com"} and access.api_key is None


@pytest.mark.parametrize("argv, message", [
    (["--max-resident-adapters", "0"], "--max-resident-adapters: Input should be greater"),
    (["--adapter-wait-seconds", "-1"], "--adapter-wait-seconds: Input should be greater"),
    (["--fine-tune-niceness", "20"], "--fine-tune-niceness: Input should be less"),
    (["--routing-kernel", "cuda"], "invalid choice: 'cuda'"),
])
def test_an_option_out_of_its_bounds_is_refused_naming_it(started, argv, message, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["serve", *argv])
    assert message in f"{refused.value.code}{capsys.readouterr().err}"
    assert started == []
