"""LLM: the offline batch API, vLLM-shaped: LLM(model_dir, **engine_options).generate(prompts, params)."""

from __future__ import annotations

from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.engine.output import RequestOutput
from kubellm.runtime.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **engine_options):
        self.engine = LLMEngine.from_kwargs(model, **engine_options)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        priority: list[int] | None = None,
        lora: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order. lora: the LoRA adapter (loaded with
        lora_modules=[name=path] or engine.load_lora) for all prompts, or one per prompt (None: the base model)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if not isinstance(params, list):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        loras = lora if isinstance(lora, list) else [lora] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError("give one LoRA adapter, or one per prompt")
        ids = [f"offline-{i}" for i in range(len(prompts))]
        requests = [
            self.engine.make_request(rid, prompt, p, priority[i] if priority else 0, lora_name=loras[i])
            for i, (rid, prompt, p) in enumerate(zip(ids, prompts, params))
        ]
        for req in requests:  # validate all before queueing any: a bad prompt loses nothing
            self.engine.add(req)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """vLLM's LLM.chat: one conversation (a list of {"role", "content"} messages) or a list of them, each
        rendered with the tokenizer's chat template as `kubellm serve` renders /v1/chat/completions."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.encode(
                self.tokenizer.apply_chat_template(
                    conversation,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    **(chat_template_kwargs or {}),
                ),
                add_special_tokens=False,
            )
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params)
