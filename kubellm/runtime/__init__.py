"""The inference runtime: engine, model code and (in server/) the OpenAI-compatible HTTP server.

The offline API is imported lazily, so `import kubellm.runtime.<light module>` does not load torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "kubellm.runtime.llm",
    "SamplingParams": "kubellm.runtime.sampling_params",
    "grammar_for": "kubellm.runtime.engine.guided",
    "RequestOutput": "kubellm.runtime.engine.output",
    "CompletionOutput": "kubellm.runtime.engine.output",
    "TokenLogprob": "kubellm.runtime.engine.wire",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kubellm.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
