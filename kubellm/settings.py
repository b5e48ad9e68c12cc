"""`kubellm serve`'s settings, in one place: EngineConfig (a plain dataclass: the GPU machine has no pydantic)
and, from its fields, the engine's serve flags (add_engine_flags), the server's pydantic settings
(runtime/server/config.py) and the flags the operator renders (engine_flag); add_serve_arguments is the whole
serve command line. Imports nothing beyond the standard library, so the CLI and the operator read it without
torch.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, fields

SCHEDULING_POLICIES = ("fcfs", "priority")
PREEMPTION_MODES = ("recompute", "swap")
KERNEL_CHOICES = ("auto", "torch", "triton")
SPECULATIVE_METHODS = ("ngram",)
QUANTIZATION_METHODS = ("fp8",)
# vLLM's --kv-cache-dtype values: auto = the model's dtype; fp8 = fp8_e4m3 (float8_e4m3fn)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (runtime/engine/speculation.py), as vLLM's --speculative-config JSON."""

    method: str = "ngram"
    num_speculative_tokens: int = 4  # k: draft tokens per step at most
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1

    @classmethod
    def parse(cls, text: str | dict | None) -> SpeculativeConfig | None:
        """vLLM's JSON object (its names; "model" absent or "[ngram]"); None: no speculation."""
        if text is None or text == "":
            return None
        spec = json.loads(text) if isinstance(text, str) else dict(text)
        if not isinstance(spec, dict):
            raise ValueError("speculative_config must be a JSON object")
        if spec.pop("model", "[ngram]") not in ("[ngram]", None):
            raise ValueError("speculative_config: only the ngram method (no draft model) is supported")
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}; known: {sorted(known)}")
        config = cls(**spec)
        if config.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config.method must be one of {SPECULATIVE_METHODS}, got {config.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config.{name} must be a positive integer, got {value!r}")
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError("speculative_config.prompt_lookup_min must not exceed prompt_lookup_max")
        return config


def _flag(default, help: str, **checks) -> object:
    """A setting `kubellm serve` takes as --its-name; checks (ge, gt, le; choices) are the server's pydantic
    checks, choices also the flag's."""
    return field(default=default, metadata={"serve": True, "help": help, **checks})


@dataclass(slots=True)
class EngineConfig:
    model: str
    dtype: str = _flag("auto", "weights' dtype: auto (the checkpoint's), float32, bfloat16, float16")
    device: str = _flag("auto", "auto (cuda when present), cuda or cpu")
    max_model_len: int | None = _flag(None, "longest prompt + output (default: the model's)", ge=1)
    max_num_seqs: int = _flag(256, "sequences in one batch at most", ge=1)
    max_num_batched_tokens: int = _flag(8192, "tokens computed in one step at most", ge=1)
    block_size: int = _flag(16, "tokens per KV-cache block (a power of two)", ge=1)
    enable_prefix_caching: bool = _flag(True, "reuse the KV of prompts' common prefixes")
    scheduling_policy: str = _flag("fcfs", f"one of {', '.join(SCHEDULING_POLICIES)}")
    preemption_mode: str = _flag("recompute", f"one of {', '.join(PREEMPTION_MODES)}")
    gpu_memory_utilization: float = _flag(0.9, "share of GPU memory for weights, activations and KV", gt=0, le=1)
    cpu_kv_cache_bytes: int = _flag(1 << 30, "KV budget when the device is the CPU", ge=0)
    swap_space_bytes: int = field(default=1 << 30, metadata={"serve": True, "ge": 0})  # flag: --swap-space GiB
    num_gpu_blocks: int | None = None  # override the computed KV budget (tests force preemption with it)
    num_cpu_blocks: int | None = None  # override the swap pool size
    queue_timeout_s: float | None = None  # a request waiting longer finishes with reason "timeout"
    enforce_eager: bool = _flag(False, "CUDA only: no CUDA graphs")
    async_scheduling: bool = _flag(True, "launch the next decode step before the host has this one's tokens")
    tensor_parallel_size: int = _flag(1, "split the model across this many GPUs of this machine", ge=1)
    kernels: str = _flag("auto", f"one of {', '.join(KERNEL_CHOICES)}: model/kernels.py")
    seed: int = _flag(0, "the engine's sampling seed (requests may bring their own)")
    # LoRA adapters (vLLM's flags): engine/lora.py, model/lora.py
    enable_lora: bool = _flag(False, "serve LoRA adapters (PEFT format) on the model: a request names one as its model")
    max_loras: int = _flag(1, "LoRA adapters loaded at once at most (each holds a slot on the device)", ge=1)
    max_lora_rank: int = _flag(16, "the largest LoRA rank an adapter may have", ge=1)
    lora_modules: tuple[str, ...] = _flag((), "LoRA adapters loaded at start, as name=path (needs --enable-lora)")
    # the fit check (kubellm/fit.py): the memory the model must fit in; the GPU's own when unset (none on CPU)
    device_memory_bytes: int | None = _flag(
        None, "memory of one device for the start-up fit check (default: the GPU's; on the CPU: no check)", ge=1
    )
    quantization: str | None = _flag(
        None,
        "fp8: round the weights of a bf16/fp32 checkpoint to FP8 at load (one scale per output channel); "
        "FP8 checkpoints (compressed-tensors, HF fine-grained) are recognized without it",
    )
    kv_cache_dtype: str = _flag(
        "auto",
        "the paged KV cache's element type: auto (the model's dtype), fp8 (= fp8_e4m3) or fp8_e5m2: one byte per "
        "value, about twice the blocks in the same memory. K and V are stored divided by per-layer scales, "
        "the checkpoint's k_scale/v_scale when it has them, else 1.0 (values kept as they are, rounded to FP8)",
        choices=KV_CACHE_DTYPES,
    )
    speculative_config: str | None = _flag(
        None,
        'speculative decoding, vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
        '"prompt_lookup_min": 1} (prompt lookup, no draft model; greedy and sampled requests: the output\'s '
        "distribution is unchanged)",
    )
    served_model_name: str | None = None  # the server's --served-model-name
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benchmarks of large shapes)

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model):
            raise ValueError(f"model directory not found: {self.model}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        SpeculativeConfig.parse(self.speculative_config)
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        self._check_lora()

    def _check_lora(self) -> None:
        if self.lora_modules and not self.enable_lora:
            raise ValueError("lora_modules needs enable_lora (--enable-lora)")
        if self.enable_lora and self.tensor_parallel_size > 1:
            raise ValueError("LoRA adapters with tensor_parallel_size > 1 are not supported yet")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be at least 1")
        modules = self.lora_module_paths()
        if len(modules) > self.max_loras:
            raise ValueError(f"max_loras: {len(modules)} lora_modules given, more than max_loras ({self.max_loras})")
        if self.served_model_name is not None and self.served_model_name in modules:
            raise ValueError(f"lora_modules: {self.served_model_name!r} is the served model's own name")

    def lora_module_paths(self) -> dict[str, str]:
        """lora_modules (name=path each) as name → path; ValueError for a malformed or repeated name."""
        out: dict[str, str] = {}
        for item in self.lora_modules:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"lora_modules: {item!r} is not name=path")
            if name in out:
                raise ValueError(f"lora_modules: the name {name!r} is given twice")
            out[name] = path
        return out

    @property
    def speculative(self) -> SpeculativeConfig | None:
        return SpeculativeConfig.parse(self.speculative_config)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineConfig:
        """Build from keyword arguments, refusing unknown names (a typo must not be ignored)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)


SERVE_SETTINGS = tuple(f for f in fields(EngineConfig) if f.metadata.get("serve"))  # what `kubellm serve` sets
FLAG_SETTINGS = tuple(f for f in SERVE_SETTINGS if "help" in f.metadata)  # those with a --flag of their own


def engine_flag(name: str) -> str:
    """`kubellm serve`'s flag for an engine setting (KeyError for a name that is not one: a renamed setting
    fails wherever its flag is rendered)."""
    if not any(f.name == name for f in FLAG_SETTINGS):
        raise KeyError(f"{name} is not an engine setting with a flag")
    return "--" + name.replace("_", "-")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The engine settings' flags of `kubellm serve` (unset: None, so lower layers keep their say)."""
    for f in FLAG_SETTINGS:
        kind = type(f.default) if f.default is not None else (str if f.type.startswith("str") else int)
        if kind is tuple:  # a list of values: --flag a b c
            parser.add_argument(engine_flag(f.name), nargs="+", metavar="VALUE", help=f.metadata["help"])
        elif kind is bool:
            parser.add_argument(
                engine_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"]
            )
        else:
            parser.add_argument(
                engine_flag(f.name), type=kind, choices=f.metadata.get("choices"), help=f.metadata["help"]
            )


TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")  # runtime/server/tool_calls.py
REASONING_PARSERS = ("deepseek_r1", "qwen3")  # runtime/server/reasoning.py


def add_serve_arguments(s: argparse.ArgumentParser) -> None:
    """Every flag of `kubellm serve` (the operator reads them too: kubellm/operator/serve_flags.py)."""
    s.add_argument("model", help="model directory (config.json, safetensors, tokenizer)")
    s.add_argument("--config", help="YAML file of settings (same names as the flags, with _ or -)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--served-model-name")
    s.add_argument("--api-key", action="append", help="an accepted API key (repeatable)")
    s.add_argument("--api-key-file", help="file with one API key per line (re-read when it changes)")
    s.add_argument(
        "--admin-key-file",
        help="file with the key that alone may load and unload adapters (client API keys may not); it opens "
        "every other endpoint too, without a rate limit (re-read when it changes)",
    )
    s.add_argument("--rate-limit-rpm", type=float, help="requests per minute per API key")
    s.add_argument("--rate-limit-burst", type=int)
    s.add_argument("--max-waiting-requests", type=int, help="429 when more requests than this are waiting")
    s.add_argument("--max-queue-time-s", type=float, help="429 when the oldest waiting request is older")
    s.add_argument(
        "--max-prompts-per-request", type=int, help="prompts in one completions request at most (default 256)"
    )
    s.add_argument(
        "--enable-api-docs",
        action="store_true",
        default=None,
        help="serve /docs, /redoc and /openapi.json (off by default: they map the API for anyone)",
    )
    s.add_argument("--max-header-bytes", type=int, help="request line + headers at most (431 past it; 64 KiB)")
    s.add_argument("--max-headers", type=int, help="request headers at most (431 past it; 100)")
    s.add_argument("--header-timeout-s", type=float, help="seconds to send a request's head (408; 30)")
    s.add_argument("--body-timeout-s", type=float, help="seconds to send a request's body (408; 60)")
    s.add_argument("--keep-alive-timeout-s", type=float, help="idle keep-alive connections close after (5)")
    s.add_argument(
        "--forwarded-allow-ips",
        nargs="+",
        metavar="IP",
        help="trusted proxies (addresses, CIDRs or '*') whose X-Forwarded-For is the client address (default: none)",
    )
    s.add_argument("--max-body-bytes", type=int)
    s.add_argument("--drain-timeout-s", "--drain-timeout", dest="drain_timeout_s", type=float)
    s.add_argument(
        "--engine-stall-timeout-s",
        type=float,
        help="/health fails when the engine process has not reported for this long (default 120)",
    )
    add_engine_flags(s)
    s.add_argument(
        "--swap-space",
        type=float,
        metavar="GIB",
        help="CPU memory for KV blocks swapped out by preemption (--preemption-mode swap), GiB (default 1)",
    )
    s.add_argument(
        "--log-requests",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one JSON log line per finished request (default on)",
    )
    s.add_argument(
        "--disable-log-requests", dest="log_requests", action="store_false", help="vLLM's spelling of --no-log-requests"
    )
    s.add_argument(
        "--allowed-origins",
        nargs="+",
        metavar="ORIGIN",
        help="browser origins allowed to call the API (CORS), e.g. https://chat.example.com or '*'",
    )
    s.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        default=None,
        help='tool_choice "auto": the model decides, its calls read by --tool-call-parser',
    )
    s.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, help="the model's tool-call format (vLLM's names)")
    s.add_argument("--reasoning-parser", choices=REASONING_PARSERS, help="split the thinking block into reasoning")
    s.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        default=None,
        help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter (with --enable-lora; off by default)",
    )
    s.add_argument(
        "--otlp-traces-endpoint",
        help="OTLP/HTTP URL for a span per request (e.g. http://collector:4318); default: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else none (tracing off)",
    )
    s.add_argument(
        "--chat-template",
        help="Jinja chat template (a file, or the template itself) replacing the "
        "model's, e.g. for a model that has none",
    )
