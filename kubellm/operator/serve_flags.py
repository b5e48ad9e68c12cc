"""The `kubellm serve` settings the operator owns, and the flags a CR's runtime.extraArgs may use, read from
the serve parser itself (so a new flag is classified here, and the CRD's CEL rules follow by regeneration).

The flags come from kubellm/settings.py (standard library only), so torch stays out of the operator
(tests/unit/test_operator_policy.py checks).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io

# Settings the operator sets from the CR (or owns outright) and that extraArgs must not override. Held as
# argparse `dest` names of `kubellm serve`; `config` reads settings (host, port, …) from a file,
# `api_key` would put keys in the CR in plain text (server.apiKeySecret is the way).
OWNED_SETTINGS = frozenset(
    {
        "host",
        "port",
        "served_model_name",
        "tensor_parallel_size",
        "device",
        "config",
        "api_key",
        "api_key_file",
        "admin_key_file",  # the operator's own key for the adapter endpoints (spec.adapters)
        "drain_timeout_s",
        "dtype",
        "max_model_len",
        "max_num_seqs",
        "max_num_batched_tokens",
        "gpu_memory_utilization",
        "scheduling_policy",
        "enable_prefix_caching",
        "rate_limit_rpm",
        "rate_limit_burst",
        "max_waiting_requests",
        "enable_auto_tool_choice",  # runtime.toolCallParser
        "tool_call_parser",
        "reasoning_parser",  # runtime.reasoningParser
        "quantization",  # runtime.quantization
        "kv_cache_dtype",  # runtime.kvCacheDtype
        "speculative_config",  # runtime.speculative
        "enable_lora",  # spec.adapters, runtime.maxLoras, runtime.maxLoraRank: the operator loads and unloads
        "max_loras",
        "max_lora_rank",
        "lora_modules",
        "allow_runtime_lora_updating",
    }
)
# Every KUBELLM_* variable is a `kubellm serve` setting (matched case-insensitively by pydantic-settings):
# settings go through the CR's fields or the checked extraArgs, never the environment. The others are the
# operator's own (HF_*) or load code into the server process (which would defeat an image allow-list).
OWNED_ENV_PREFIX = "KUBELLM_"
OWNED_ENV = frozenset(
    {
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONUSERBASE",
        "PYTHONPLATLIBDIR",
    }
)
MODEL_PLACEHOLDER = "/models/model"


class ServeArgsError(Exception):
    """The arguments do not parse as `kubellm serve`'s."""


@functools.cache
def serve_parser() -> argparse.ArgumentParser:
    """`kubellm serve`'s own arguments (kubellm/settings.py: stdlib only, no CLI, no torch), with abbreviations
    off (`--po` is not `--port`) and errors raised instead of exiting."""
    from kubellm.settings import add_serve_arguments

    def fail(message: str = "", *_):
        raise ServeArgsError(message)

    parser = argparse.ArgumentParser(prog="kubellm serve", allow_abbrev=False)
    add_serve_arguments(parser)
    parser.error = fail
    parser.exit = lambda status=0, message=None: fail(message or "--help exits")
    return parser


def serve_flags() -> dict[str, str]:
    """Every long flag of `kubellm serve` → its setting (argparse dest)."""
    return {
        opt: action.dest for action in serve_parser()._actions for opt in action.option_strings if opt.startswith("--")
    }


def allowed_extra_flags() -> list[str]:
    """The flags runtime.extraArgs may use: every `kubellm serve` flag whose setting the operator does not own."""
    return sorted(f for f, dest in serve_flags().items() if dest not in OWNED_SETTINGS and dest != "help")


def parse_serve_args(args: list[str]) -> dict:
    """The settings `kubellm serve MODEL *args` would get from its flags (unset: None)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return vars(serve_parser().parse_args([MODEL_PLACEHOLDER, *args]))


def extra_args_rule() -> str:
    """CEL for runtime.extraArgs: every flag-like item is an allowed flag spelled in full (`--po` is refused)."""
    flags = "|".join(allowed_extra_flags())
    return f"self.all(a, !a.startsWith('-') || a.matches('^-[0-9.]') || a.matches('^({flags})(=.*)?$'))"


def env_rule() -> str:
    names = ", ".join(f"'{n}'" for n in sorted(OWNED_ENV))
    return f"self.all(e, !e.name.upperAscii().startsWith('{OWNED_ENV_PREFIX}') && !(e.name in [{names}]))"
