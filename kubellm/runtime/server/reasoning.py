"""Reasoning parsers (vLLM's `--reasoning-parser` names): the thinking block of the generated text, split from the
answer. `split(text, final)` → (reasoning, answer so far); prefix-stable, like the tool parsers (tool_calls.py),
so that a stream's `delta.reasoning_content` pieces assemble to the non-streamed `message.reasoning_content`."""

from __future__ import annotations

from kubellm.runtime.server.tool_calls import held_back

START, END = "<think>", "</think>"


class ReasoningParser:
    name = ""

    def split(self, text: str, final: bool) -> tuple[str | None, str]:
        raise NotImplementedError

    @staticmethod
    def _until_end(text: str, i: int, final: bool) -> tuple[str, str]:
        """Reasoning from text[i] up to </think> (or all of it, less a possible partial marker), and the rest."""
        end = text.find(END, i)
        if end >= 0:
            return text[i:end], text[end + len(END) :]
        reasoning = text[i:] if final else text[i : len(text) - held_back(text[i:], END)]
        return reasoning, ""


class DeepSeekR1Parser(ReasoningParser):
    """DeepSeek-R1: the prompt opens the block (`<think>\\n`), so the answer is reasoning up to `</think>` (all
    of it if that never comes); a `<think>` the model writes itself is dropped."""

    name = "deepseek_r1"

    def split(self, text, final):
        i = 0
        if text.startswith(START):
            i = len(START)
        elif not final and START.startswith(text):
            return None, ""
        reasoning, rest = self._until_end(text, i, final)
        return reasoning, rest


class Qwen3Parser(ReasoningParser):
    """Qwen3: reasoning only inside a `<think>…</think>` block the answer opens with (the template writes an
    empty block into the prompt when thinking is off, so that answer is all content)."""

    name = "qwen3"

    def split(self, text, final):
        if text.startswith(START):
            return self._until_end(text, len(START), final)
        if not final and START.startswith(text):
            return None, ""
        return None, text


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (DeepSeekR1Parser, Qwen3Parser)}
