"""LLMEngine: the engine in the caller's process (the offline LLM, tests, benchmarks): intake → EngineCore →
OutputProcessor, the same three parts the server splits over two processes (async_engine.py)."""

from __future__ import annotations

import logging

from kubellm.runtime.engine.core import EngineCore
from kubellm.runtime.engine.intake import Submission, make_submission
from kubellm.runtime.engine.output import OutputProcessor, RequestOutput
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.settings import EngineConfig

log = logging.getLogger("kubellm.engine")


class LLMEngine:
    def __init__(self, config: EngineConfig, make_core=EngineCore):
        from transformers import AutoTokenizer

        self.config = config
        self.core = make_core(config)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.output = OutputProcessor(self.tokenizer)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> LLMEngine:
        return cls(EngineConfig.from_kwargs(model, **kwargs))

    # the core's state, read by tests and benchmarks
    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.core.vocab_size

    @property
    def block_manager(self):
        return self.core.block_manager

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def stats(self):
        return self.core.stats

    @property
    def runner(self):
        return self.core.runner

    @property
    def num_steps_ahead(self) -> int:
        return self.core.num_steps_ahead

    @property
    def num_running(self) -> int:
        return self.core.num_running

    @property
    def num_waiting(self) -> int:
        return self.core.num_waiting

    # ------------------------------------------------------------------ requests
    def make_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_name: str | None = None,
    ) -> Submission:
        """Tokenize and validate (ValueError with a message for the user); touches no engine state."""
        return make_submission(
            self.tokenizer,
            self.vocab_size,
            self.max_model_len,
            request_id,
            prompt,
            params,
            priority,
            arrival_time,
            lora_name,
        )

    def add(self, sub: Submission) -> None:
        self.core.add(sub.request)
        req = sub.request
        self.output.add(req.request_id, sub.prompt, req.prompt_token_ids, req.params, req.arrival_time)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        lora_name: str | None = None,
    ) -> None:
        self.add(self.make_request(request_id, prompt, params or SamplingParams(), priority, lora_name=lora_name))

    def load_lora(self, name: str, path: str) -> None:
        """Load a LoRA adapter (--enable-lora); LoraError naming the field when it cannot be."""
        from kubellm.runtime.engine.wire import LoadLora
        from kubellm.runtime.model.lora import LoraError

        reply = self.core.lora_op(LoadLora("offline", name, path))
        if reply.error is not None:
            raise LoraError(reply.error, reply.field)

    def unload_lora(self, name: str) -> None:
        from kubellm.runtime.engine.wire import UnloadLora
        from kubellm.runtime.model.lora import LoraError

        reply = self.core.lora_op(UnloadLora("offline", name))
        if reply.error is not None:
            raise LoraError(reply.error, reply.field)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.core.abort(request_id)
        return self.output.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.output.requests)

    def step(self) -> list[RequestOutput]:
        """One engine step; the outputs of every request that changed. A sequence whose stop string appeared
        is stopped in the core before its next step. A request the core failed in it (its grammar broke:
        engine/guided.py grammar_failure) comes back finished with finish_reason "error" and the reason in
        .error (logged too); the others go on."""
        outputs, aborts = self.output.process(self.core.step())
        for abort in aborts:
            self.core.abort(abort.request_id, abort.index)
        for request_id, why in self.core.take_failures():
            log.warning("request %s failed: %s", request_id, why)
            failed = self.output.abort(request_id, error=why)
            if failed is not None:
                outputs.append(failed)
        return outputs

    def snapshot(self):
        return self.core.snapshot()

    def shutdown(self) -> None:
        self.core.shutdown()
