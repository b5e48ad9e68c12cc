"""The inference runtime: engine, model code and (in server/) the OpenAI-compatible HTTP server."""

from kubellm.runtime.engine.guided import grammar_for
from kubellm.runtime.engine.sequence import CompletionOutput, RequestOutput, TokenLogprob
from kubellm.runtime.llm import LLM
from kubellm.runtime.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "grammar_for", "RequestOutput", "CompletionOutput", "TokenLogprob"]
