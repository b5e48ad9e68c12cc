"""`kubellm serve` settings come from flags or KUBELLM_* environment variables, validated by pydantic."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kubellm.cli import build_parser, main, serve_config
from kubellm.runtime.server.config import ServerConfig


def test_environment_variables_configure_the_server(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBELLM_MAX_NUM_SEQS", "12")
    monkeypatch.setenv("KUBELLM_API_KEYS", '["k1", "k2"]')
    monkeypatch.setenv("KUBELLM_RATE_LIMIT_RPM", "30")
    c = ServerConfig(model=str(tmp_path))
    assert (c.max_num_seqs, c.api_keys, c.rate_limit_rpm) == (12, ["k1", "k2"], 30.0)
    assert c.engine_options()["max_num_seqs"] == 12 and c.model_name == tmp_path.name


def test_flags_win_over_the_environment_and_bad_values_are_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KUBELLM_MAX_NUM_SEQS", "12")
    assert ServerConfig(model=str(tmp_path), max_num_seqs=3).max_num_seqs == 3
    with pytest.raises(ValidationError):
        ServerConfig(model=str(tmp_path), port=70000)
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "invalid settings" in capsys.readouterr().err


def test_yaml_file_under_env_under_flags(monkeypatch, tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("max-num-seqs: 7\nrate_limit_rpm: 10\ndrain_timeout_s: 5\n")
    assert ServerConfig.load({"model": str(tmp_path)}, str(cfg)).max_num_seqs == 7
    monkeypatch.setenv("KUBELLM_MAX_NUM_SEQS", "9")
    c = ServerConfig.load({"model": str(tmp_path), "drain_timeout_s": 1.0}, str(cfg))
    assert (c.max_num_seqs, c.rate_limit_rpm, c.drain_timeout_s) == (9, 10.0, 1.0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_num_seqz: 3\n")
    assert main(["serve", str(tmp_path), "--config", str(bad)]) == 2


def test_chat_template_is_a_file_or_the_template_itself(tmp_path, capsys):
    inline = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert ServerConfig(model=str(tmp_path), chat_template=inline).chat_template == inline
    path = tmp_path / "t.jinja"
    path.write_text(inline)
    assert ServerConfig(model=str(tmp_path), chat_template=str(path)).chat_template == inline
    assert main(["serve", str(tmp_path), "--chat-template", str(tmp_path / "missing.jinja")]) == 2
    assert "chat_template is neither a readable file nor a Jinja template" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--chat-template", "{% for m in messages %}{{ m.content }}"]) == 2
    assert "chat_template is not a valid Jinja template" in capsys.readouterr().err


def test_vllm_flags_map_onto_the_settings(tmp_path):
    def parse(*flags):
        return serve_config(build_parser().parse_args(["serve", str(tmp_path), *flags]))

    default = parse()
    assert default.log_requests and default.allowed_origins == [] and default.swap_space_bytes == 1 << 30
    c = parse("--swap-space", "4", "--disable-log-requests", "--allowed-origins", "https://a.example", "*")
    assert c.engine_options()["swap_space_bytes"] == 4 << 30
    assert not c.log_requests and c.allowed_origins == ["https://a.example", "*"]
    assert not parse("--no-log-requests").log_requests and parse("--log-requests").log_requests
    assert main(["serve", str(tmp_path), "--swap-space", "-1"]) == 2


def test_engine_settings_have_one_source(tmp_path):
    """kubellm/settings.py's EngineConfig is where an engine setting lives: its serve flags, the server's
    pydantic fields and the operator's rendered flags all derive from it, and drift fails here."""
    import dataclasses

    import yaml

    from kubellm.operator.render import render
    from kubellm.settings import FLAG_SETTINGS, SERVE_SETTINGS, EngineConfig, engine_flag

    serve = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    dests = {a.dest for a in serve._actions}
    assert {f.name for f in FLAG_SETTINGS} <= dests
    assert {f.name for f in SERVE_SETTINGS} <= set(ServerConfig.model_fields)
    defaults = ServerConfig(model=str(tmp_path))
    for f in SERVE_SETTINGS:
        assert getattr(defaults, f.name) == f.default, f.name
    with pytest.raises(KeyError):
        engine_flag("max_num_seq")
    assert set(defaults.engine_options()) <= {f.name for f in dataclasses.fields(EngineConfig)}
    # every example's rendered runtime arguments parse as `kubellm serve` flags, with no abbreviation
    for example in ("minimal", "pvc", "gpu-autoscaled"):
        with open(Path(__file__).parents[2] / "manifests" / "examples" / f"{example}.yaml") as fh:
            isvc = next(d for d in yaml.safe_load_all(fh) if d and d.get("kind") == "InferenceService")
        isvc["metadata"].update(namespace="default", uid="00000000-0000-0000-0000-000000000000")
        deployment = next(c for c in render(isvc) if c["kind"] == "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        config = serve_config(build_parser().parse_args(container["args"]))
        assert config.max_num_seqs == isvc["spec"].get("runtime", {}).get("maxNumSeqs", config.max_num_seqs)
