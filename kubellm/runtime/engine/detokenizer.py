"""Incremental detokenization (vLLM's prefix/read offsets), batched over many streams per call into the Rust
tokenizer. The engine uses it for offline generation and for requests with stop strings; the server process
uses it for every other streamed request, so the engine's step loop does not pay for text it never needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PROMPT_CONTEXT = 5  # prompt tokens decoded with the first generated ones (a leading space, a merged byte)


class TextStream(Protocol):
    """What incremental detokenization reads and advances (a Sequence, or the server's DecodeState)."""

    token_ids: list[int]  # prompt + generated
    prefix_offset: int
    read_offset: int
    text: str


@dataclass(slots=True)
class DecodeState:
    """The server side's incremental-detokenization state of one generated stream."""

    token_ids: list[int]
    prefix_offset: int
    read_offset: int
    text: str = ""

    @classmethod
    def after_prompt(cls, prompt_token_ids: list[int]) -> DecodeState:
        tail = list(prompt_token_ids[-PROMPT_CONTEXT:])
        return cls(tail, 0, len(tail))


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer: the Python wrapper costs more than a decode
        self.clean_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))

    def decode_batch(self, ids: list[list[int]], skip_special_tokens: bool) -> list[str]:
        texts = self.backend.decode_batch(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up:
            texts = [self.tokenizer.clean_up_tokenization(t) for t in texts]
        return texts

    def advance(self, streams: list[TextStream], skip_special_tokens: list[bool]) -> None:
        """Append each stream's newly complete text; a trailing partial character waits for the next token."""
        for skip in (True, False):
            group = [s for s, k in zip(streams, skip_special_tokens) if k is skip]
            if not group:
                continue
            prefixes = self.decode_batch([s.token_ids[s.prefix_offset : s.read_offset] for s in group], skip)
            fulls = self.decode_batch([s.token_ids[s.prefix_offset :] for s in group], skip)
            for s, prefix, full in zip(group, prefixes, fulls):
                if len(full) > len(prefix) and not full.endswith("\ufffd"):
                    s.text += full[len(prefix) :]
                    s.prefix_offset, s.read_offset = s.read_offset, len(s.token_ids)

    def flush(self, stream: TextStream, skip_special_tokens: bool) -> None:
        """At the end: whatever is left (a partial character decodes to U+FFFD, as HF's decode would)."""
        if stream.read_offset < len(stream.token_ids):
            stream.text += self.decode_batch([stream.token_ids[stream.read_offset :]], skip_special_tokens)[0]
            stream.read_offset = len(stream.token_ids)
