"""ServerConfig: every `kubellm serve` setting, from flags or KUBELLM_* environment variables (pydantic)."""

from __future__ import annotations

import os
import typing
from typing import Literal

from pydantic import Field, create_model, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubellm.settings import REASONING_PARSERS, SERVE_SETTINGS, TOOL_CALL_PARSERS, EngineConfig


class ServerSettings(BaseSettings):
    """The server's own settings; ServerConfig below adds the engine's, from kubellm/settings.py."""

    model_config = SettingsConfigDict(env_prefix="KUBELLM_", extra="forbid")

    model: str
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    served_model_name: str | None = None
    api_keys: list[str] = Field(default_factory=list)
    api_key_file: str | None = None  # one key per line; re-read when it changes (a mounted Secret)
    # the key that alone opens /v1/load_lora_adapter and /v1/unload_lora_adapter (client API keys do not), and
    # every other endpoint too, never rate limited: the operator's, from a Secret it makes (re-read the same way)
    admin_key_file: str | None = None
    rate_limit_rpm: float | None = Field(None, gt=0)  # per API key (or client address without keys)
    rate_limit_burst: int = Field(20, ge=1)
    max_waiting_requests: int = Field(1024, ge=0)  # more sequences (prompts × n) waiting than this: 429
    max_prompts_per_request: int = Field(256, ge=1)  # a completions request's prompt list (one batch's worth)
    enable_api_docs: bool = False  # /docs, /redoc, /openapi.json
    # HTTP limits (http_limits.py, admission.py): a request's head (request line + headers) and header count,
    # how long a client may take to send the head and the body, how long an idle keep-alive connection stays
    max_header_bytes: int = Field(64 << 10, ge=1024)
    max_headers: int = Field(100, ge=8)
    header_timeout_s: float = Field(30.0, gt=0)
    body_timeout_s: float = Field(60.0, gt=0)
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    # proxies (addresses or CIDRs, "*" for any) whose X-Forwarded-For names the client; none by default
    forwarded_allow_ips: list[str] = Field(default_factory=list)
    max_queue_time_s: float | None = Field(30.0, gt=0)  # oldest waiting request older than this: 429
    max_body_bytes: int = Field(8 << 20, ge=1024)
    drain_timeout_s: float = Field(30.0, ge=0)
    # the engine process reports every step and every second when idle; silence this long means it is stuck
    # (a hung kernel, a deadlock): /health fails so that Kubernetes restarts the pod
    engine_stall_timeout_s: float = Field(120.0, gt=0)
    log_requests: bool = True
    # browser origins allowed to call the API (CORS; vLLM's flag); none by default: no CORS headers at all
    allowed_origins: list[str] = Field(default_factory=list)
    # a Jinja chat template replacing the tokenizer's (or supplying one it lacks): a file, or the template itself
    chat_template: str | None = None
    # tool calling and reasoning (vLLM's flags): chat_output.py
    enable_auto_tool_choice: bool = False
    tool_call_parser: Literal[TOOL_CALL_PARSERS] | None = None  # type: ignore[valid-type]
    reasoning_parser: Literal[REASONING_PARSERS] | None = None  # type: ignore[valid-type]
    # /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING); with --enable-lora
    allow_runtime_lora_updating: bool = False
    # OpenTelemetry spans over OTLP/HTTP (kubellm/tracing.py); None: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else off
    otlp_traces_endpoint: str | None = None

    @field_validator("chat_template")
    @classmethod
    def _read_chat_template(cls, value: str | None) -> str | None:
        """Read (a path) and parse now: a missing file or a broken template stops the server before it loads a
        model, instead of failing every chat request."""
        if value is None:
            return value
        if "{{" not in value and "{%" not in value:
            try:
                with open(value) as f:
                    value = f.read()
            except OSError as e:
                raise ValueError(f"chat_template is neither a readable file nor a Jinja template: {e}") from None
        import jinja2

        try:
            jinja2.Environment().parse(value)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat_template is not a valid Jinja template: {e} (line {e.lineno})") from None
        return value

    def engine_options(self) -> dict:
        """The settings that are EngineConfig's (model included; the served name is resolved separately)."""
        return {"model": self.model} | {f.name: getattr(self, f.name) for f in SERVE_SETTINGS}

    @classmethod
    def load(cls, flags: dict, yaml_path: str | None = None) -> ServerSettings:
        """Flags win over KUBELLM_* environment variables, which win over the YAML file, then defaults."""
        values: dict = {}
        if yaml_path:
            import yaml

            with open(yaml_path) as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{yaml_path}: expected a mapping of settings")
            prefix = cls.model_config.get("env_prefix", "")
            values = {k.replace("-", "_"): v for k, v in loaded.items()}
            values = {k: v for k, v in values.items() if f"{prefix}{k}".upper() not in os.environ}
        return cls(**{**values, **flags})

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.rstrip("/").rsplit("/", 1)[-1]


def _engine_fields() -> dict:
    hints = typing.get_type_hints(EngineConfig)
    bounds = ("ge", "gt", "le")
    return {
        f.name: (
            Literal[f.metadata["choices"]] if "choices" in f.metadata else hints[f.name],  # type: ignore[valid-type]
            Field(f.default, **{k: f.metadata[k] for k in bounds if k in f.metadata}),
        )
        for f in SERVE_SETTINGS
    }


ServerConfig = create_model("ServerConfig", __base__=ServerSettings, __module__=__name__, **_engine_fields())
