"""Structured output (a JSON schema, JSON of any object, a regex, a choice of strings, a Lark grammar) with
llguidance: every sequence of a guided request has a matcher that follows its tokens; before each draw the
row's logits of tokens the grammar does not allow next are set to -inf, and the sequence ends once its grammar
is complete. llguidance is imported only when a request asks for a grammar."""

from __future__ import annotations

import re
import threading

import numpy as np
import torch

KINDS = ("json", "regex", "choice", "lark")


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError:
        raise ValueError("structured output needs llguidance (pip install llguidance)") from None
    return llguidance


def grammar_for(kind: str, spec) -> str:
    """The llguidance grammar of one request form: json (a JSON schema, as a dict or a string), regex, choice
    (a list of strings), lark. JSON is compact (no free whitespace, as OpenAI's) unless the schema's
    "x-guidance" says otherwise. Raises ValueError for a spec that is not of its kind's form."""
    matcher = _llguidance().LLMatcher
    if kind == "json":
        return matcher.grammar_from_json_schema(spec, defaults={"whitespace_flexible": False})
    if kind == "regex":
        return matcher.grammar_from_regex(spec)
    if kind == "choice":
        return matcher.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in spec))
    if kind == "lark":
        return matcher.grammar_from_lark(spec)
    raise ValueError(f"unknown grammar kind {kind!r}; one of {', '.join(KINDS)}")


class Grammars:
    """Grammars over one tokenizer: its llguidance view, built once on first use (a pass over the vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._lltokenizer = None
        self._lock = threading.Lock()

    def _tok(self):
        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = _llguidance().hf.from_tokenizer(self._tokenizer, n_vocab=self._vocab_size)
            return self._lltokenizer

    def error(self, grammar: str) -> str:
        """Why this grammar cannot be used ("" when it can)."""
        return _llguidance().LLMatcher.validate_grammar(grammar, self._tok())

    def matcher(self, grammar: str):
        m = _llguidance().LLMatcher(self._tok(), grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"invalid grammar: {m.get_error()}")
        return m


_executor = None  # llguidance's thread pool: the masks of a batch's guided rows are computed in parallel


def mask_disallowed(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """In place: -inf in row rows[j] of logits wherever matchers[j] does not allow the next token."""
    global _executor
    if _executor is None:
        _executor = _llguidance().LLExecutor()
    vocab = logits.shape[1]
    words = (vocab + 31) // 32
    bits = np.zeros((len(rows), words), dtype=np.int32)
    _executor.unsafe_compute_mask_ptr([(m, j) for j, m in enumerate(matchers)], bits.ctypes.data, words * 4, len(rows))
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab]  # bit i of word w: 32w+i
    forbidden = torch.from_numpy(allowed == 0).to(logits.device)
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(forbidden, float("-inf"))
