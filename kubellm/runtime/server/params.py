"""From an OpenAI request to engine submissions: SamplingParams (grammars compiled off the event loop), the chat
template, prompts tokenized and checked against the context, all before any is queued (a 400 naming the field)."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

from kubellm.runtime.engine.async_engine import AsyncLLMEngine
from kubellm.runtime.engine.guided import Grammars, grammar_for
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.chat_output import template_messages, template_tools
from kubellm.runtime.server.errors import ApiError

if TYPE_CHECKING:
    from kubellm.runtime.engine.intake import Submission

# Texts up to this long are tokenized on the event loop (well under a millisecond with a fast tokenizer).
INLINE_TOKENIZE_CHARS = 4096


class RequestBuilder:
    def __init__(self, engine: AsyncLLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._grammars: Grammars | None = None  # built on first use: the vocabulary size is known once it runs
        # a text of N characters is at least N / (the longest token's length) tokens: longer than the context
        # can ever hold is refused before the tokenizer spends seconds on it
        self._longest_token = max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1
        # tokenization runs here, off the event loop that streams everyone's tokens and answers /health; one
        # thread: the Rust tokenizer releases the GIL, and one object is never encoding twice at once
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="kubellm-tokenize")
        # chat_template_kwargs are variables for the template; the call's own arguments (tokenize, chat_template,
        # return_dict, …) would change what comes back or which template runs
        self._template_call_args = set(inspect.signature(self.tokenizer.apply_chat_template).parameters) - {"kwargs"}

    # ------------------------------------------------------------------ sampling
    def grammar(self, name: str, kind: str, spec) -> str:
        """The llguidance grammar of the structured output asked for, checked here (400) before it queues."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.engine.vocab_size)
        try:
            compiled = grammar_for(kind, spec)
            error = self._grammars.error(compiled) or self._grammars.added_token_error(kind, spec)
        except (ValueError, TypeError, RuntimeError) as e:
            error = str(e)
        if error:
            raise ApiError(400, f"{name}: {error}", param=name)
        return compiled

    async def sampling_params(
        self, req: p.SamplingFields, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        vocab_size = self.engine.vocab_size
        if req.logit_bias and max(req.logit_bias) >= vocab_size:
            raise ApiError(400, f"logit_bias token ids must be in [0, {vocab_size})", param="logit_bias")
        for name in ("stop_token_ids", "allowed_token_ids"):
            outside = [t for t in getattr(req, name) or () if t >= vocab_size]
            if outside:
                raise ApiError(
                    400, f"{name}: token id {outside[0]} is outside the vocabulary (size {vocab_size})", param=name
                )
        # compiling a grammar (and, the first time, llguidance's view of the vocabulary) takes milliseconds to
        # a second: off the event loop, which is streaming everyone else's tokens
        asked = req.structured_output()
        compiled = await asyncio.to_thread(self.grammar, *asked) if asked else None
        try:
            return SamplingParams(
                n=req.n,
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                min_p=req.min_p or 0.0,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                seed=None if req.seed in (None, -1) else req.seed,
                stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
                stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
                logit_bias=dict(req.logit_bias or {}),
                grammar=compiled,
                min_tokens=req.min_tokens,
                allowed_token_ids=None if req.allowed_token_ids is None else sorted(set(req.allowed_token_ids)),
                prompt_logprobs=req.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            )
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    # ------------------------------------------------------------------ prompts
    def render_chat(self, req: p.ChatCompletionRequest | p.TokenizeRequest) -> str:
        """The messages as the chat template writes them (the prompt text, special tokens included)."""
        reserved = sorted(self._template_call_args & set(req.chat_template_kwargs or {}))
        if reserved:
            raise ApiError(400, f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        messages = template_messages(req)
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=template_tools(req, self.tokenizer),
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                **(req.chat_template_kwargs or {}),
            )
        except Exception as e:  # the template rejected these messages (roles, order, …)
            raise ApiError(400, f"the chat template could not render these messages: {e}", param="messages") from None

    def check_length(self, text: str | list[int], param: str = "prompt") -> None:
        """400 for a text too long to fit the context whatever its tokens (cheap: before tokenizing it)."""
        limit = self.engine.max_model_len * self._longest_token
        if isinstance(text, str) and len(text) > limit:
            raise ApiError(
                400,
                f"{param} has {len(text)} characters: more than this model's context of "
                f"{self.engine.max_model_len} tokens can hold",
                param=param,
            )

    async def off_loop(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the tokenizer's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, partial(fn, *args, **kwargs))

    async def tokenizing(self, prompt: str | list[int], fn, *args, **kwargs):
        """fn(*args, **kwargs), which tokenizes prompt: on the loop when that is cheaper than a handoff to the
        tokenizer's thread (token ids, short texts), on that thread for long texts, which would stall every
        stream. A handoff waits for the GIL while the loop is busy (up to its 5 ms switch interval): paid for
        every request of a 256-request burst, it added ~250 ms to their first tokens (bench/RESULTS.md)."""
        if isinstance(prompt, list) or len(prompt) <= INLINE_TOKENIZE_CHARS:
            return fn(*args, **kwargs)
        return await self.off_loop(fn, *args, **kwargs)

    async def encode(self, text: str, param: str = "prompt", **kwargs) -> list[int]:
        self.check_length(text, param)
        return await self.tokenizing(text, self.tokenizer.encode, text, **kwargs)

    def check_context(self, prompt_len: int, max_tokens: int | None) -> None:
        limit = self.engine.max_model_len
        if prompt_len + (max_tokens or 1) > limit:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + (max_tokens or 1)} tokens ({prompt_len} in the messages, "
                f"{max_tokens or 1} in the completion).",
                param="max_tokens",
            )

    async def truncate(self, prompt: str | list[int], keep: int | None) -> str | list[int]:
        """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (-1: as many as the context holds)."""
        if keep is None:
            return prompt
        limit = self.engine.max_model_len
        if keep == -1:
            keep = limit
        elif keep > limit:
            raise ApiError(
                400,
                f"truncate_prompt_tokens ({keep}) must not exceed the context ({limit})",
                param="truncate_prompt_tokens",
            )
        ids = await self.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else prompt
        return ids[-keep:] if len(ids) > keep else prompt

    async def make_requests(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams,
        priority: int,
        max_tokens: int | None,
        truncate_prompt_tokens: int | None = None,
        model: str | None = None,
    ) -> list[Submission]:
        """Tokenize and validate every prompt before queueing any. model: the request's; a LoRA adapter's name
        runs it with that adapter (admission has checked that it is the served model or a loaded adapter)."""
        lora = model if model in self.engine.loras else None
        out = []
        for prompt in prompts:
            prompt = await self.truncate(prompt, truncate_prompt_tokens)
            try:
                self.check_length(prompt)
                r = await self.tokenizing(
                    prompt, self.engine.make_request, f"req-{uuid.uuid4().hex}", prompt, params, priority, lora
                )
            except ValueError as e:
                raise ApiError(400, str(e), param="prompt") from None
            self.check_context(len(r.prompt_token_ids), max_tokens)
            out.append(r)
        return out
