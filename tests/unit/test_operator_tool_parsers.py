"""runtime.toolCallParser, runtime.reasoningParser, runtime.quantization, runtime.kvCacheDtype and
runtime.speculative: typed CRD fields rendered into `kubellm serve` flags the serve parser accepts, owned by the
operator (not settable again through extraArgs)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubellm.operator.render import render
from kubellm.operator.serve_flags import allowed_extra_flags, parse_serve_args
from kubellm.operator.spec import InferenceServiceSpec
from kubellm.settings import SpeculativeConfig


def isvc(runtime: dict) -> dict:
    return {
        "apiVersion": "kubellm.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "agents", "namespace": "team-a", "uid": "uid-1", "generation": 1},
        "spec": {"model": {"uri": "hf://Qwen/Qwen3-8B"}, "runtime": runtime},
    }


def serve_args(runtime: dict) -> list[str]:
    (deployment,) = [c for c in render(isvc(runtime)) if c["kind"] == "Deployment"]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "runtime"]
    return container["args"]


def test_parsers_are_rendered_as_serve_flags():
    args = serve_args({"toolCallParser": "hermes", "reasoningParser": "qwen3"})
    parsed = parse_serve_args(args[2:])
    assert parsed["enable_auto_tool_choice"] is True
    assert (parsed["tool_call_parser"], parsed["reasoning_parser"]) == ("hermes", "qwen3")
    plain = parse_serve_args(serve_args({})[2:])
    assert (plain["enable_auto_tool_choice"], plain["tool_call_parser"], plain["reasoning_parser"]) == (None,) * 3


def test_unknown_parser_is_refused_and_extra_args_cannot_set_them():
    with pytest.raises(ValidationError, match="toolCallParser|tool_call_parser"):
        InferenceServiceSpec.model_validate({"model": {"uri": "hf://a/b"}, "runtime": {"toolCallParser": "nope"}})
    flags = allowed_extra_flags()
    assert not {"--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser"} & set(flags)


def test_quantization_and_speculation_are_rendered_as_serve_flags():
    speculative = {"enabled": True, "numSpeculativeTokens": 3, "promptLookupMax": 5}
    args = serve_args({"quantization": "fp8", "speculative": speculative})
    parsed = parse_serve_args(args[2:])
    assert parsed["quantization"] == "fp8"
    config = SpeculativeConfig.parse(parsed["speculative_config"])  # what the server will parse
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_max, config.prompt_lookup_min) == (
        "ngram",
        3,
        5,
        1,
    )
    for runtime in ({}, {"speculative": {"numSpeculativeTokens": 3}}):  # off unless enabled
        plain = parse_serve_args(serve_args(runtime)[2:])
        assert (plain["quantization"], plain["speculative_config"]) == (None, None)
    assert not {"--quantization", "--speculative-config"} & set(allowed_extra_flags())


@pytest.mark.parametrize(
    "runtime, field",
    [
        ({"quantization": "int3"}, "quantization"),
        ({"speculative": {"method": "eagle"}}, "method"),
        ({"speculative": {"numSpeculativeTokens": 0}}, "numSpeculativeTokens|num_speculative_tokens"),
    ],
)
def test_bad_quantization_or_speculation_is_refused(runtime, field):
    with pytest.raises(ValidationError, match=field):
        InferenceServiceSpec.model_validate({"model": {"uri": "hf://a/b"}, "runtime": runtime})


def test_kv_cache_dtype_is_rendered_as_a_serve_flag_and_refused_when_unknown():
    parsed = parse_serve_args(serve_args({"kvCacheDtype": "fp8"})[2:])
    assert parsed["kv_cache_dtype"] == "fp8"
    assert parse_serve_args(serve_args({})[2:])["kv_cache_dtype"] is None  # auto: the engine's default, no flag
    assert "--kv-cache-dtype" not in allowed_extra_flags()
    with pytest.raises(ValidationError, match="kvCacheDtype|kv_cache_dtype"):
        InferenceServiceSpec.model_validate({"model": {"uri": "hf://a/b"}, "runtime": {"kvCacheDtype": "int8"}})
