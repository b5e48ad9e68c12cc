"""Structured output (a JSON schema, JSON of any object, a regex, a choice of strings, a Lark grammar) with
llguidance: every sequence of a guided request has a matcher that follows its tokens; before each draw the
row's logits of tokens the grammar does not allow next are set to -inf, and the sequence ends once its grammar
is complete. llguidance is imported only when a request asks for a grammar."""

from __future__ import annotations

import json
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


def grammar_failure(error: str) -> str:
    """What a request is told when its grammar rejected a token drawn under the grammar's own mask. The known
    cause: llguidance forces text by tokenizing it, and text such as `<think>` tokenizes to an added token,
    which the grammar's text then does not match (Grammars.added_token_error refuses such json, regex and
    choice specs up front; a quoted Lark literal still gets here)."""
    first = error.strip().splitlines()[0] if error.strip() else "no detail"
    return (
        f"structured output failed: the grammar rejected a token its own mask allowed ({first}). A literal that"
        " is the text of one of the tokenizer's added tokens (such as <think>) cannot be generated as text; in"
        " a Lark grammar (guided_grammar) write it unquoted, <think>, to ask for the token itself"
    )


def _generated_texts(schema):
    """The strings of a JSON schema that end up in the output (const and enum values, patterns, property
    names), not its descriptions or titles."""
    if isinstance(schema, list):
        for item in schema:
            yield from _generated_texts(item)
    elif isinstance(schema, dict):
        for key, value in schema.items():
            if key in ("const", "enum", "pattern"):
                yield json.dumps(value) if not isinstance(value, str) else value
            elif key == "properties" and isinstance(value, dict):
                yield from value
                yield from _generated_texts(list(value.values()))
            elif key not in ("description", "title", "examples", "$comment"):
                yield from _generated_texts(value)


class Grammars:
    """Grammars over one tokenizer: its llguidance view, built once on first use (a pass over the vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._lltokenizer = None
        self._added: list[tuple[str, int]] | None = None
        self._lock = threading.Lock()

    def _tok(self):
        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = _llguidance().hf.from_tokenizer(self._tokenizer, n_vocab=self._vocab_size)
            return self._lltokenizer

    def error(self, grammar: str) -> str:
        """Why this grammar cannot be used ("" when it can)."""
        return _llguidance().LLMatcher.validate_grammar(grammar, self._tok())

    def added_token_error(self, kind: str, spec) -> str:
        """Why a json, regex or choice spec cannot be used ("" when it can): it contains the text of an added
        token (Qwen3's <think>, <tool_call>), which llguidance would force as that token and then reject
        (grammar_failure). Lark grammars name such tokens in their own syntax and are not checked here."""
        if kind not in ("json", "regex", "choice"):
            return ""
        if kind == "json":
            texts = list(_generated_texts(json.loads(spec) if isinstance(spec, str) else spec))
        else:
            texts = [spec] if isinstance(spec, str) else [str(c) for c in spec]
        for content, token_id in self._added_texts():
            if any(content in t for t in texts):
                return (
                    f"contains {content!r}, the text of the tokenizer's added token {token_id}, which structured"
                    f" output cannot generate as text; to ask for that token use guided_grammar (Lark), where it"
                    f" is written unquoted: {content}"
                )
        return ""

    def _added_texts(self) -> list[tuple[str, int]]:
        if self._added is None:
            # every added token, special or not (Qwen3's <think> is not): the tokenizer matches each as a whole
            added = self._tokenizer.added_tokens_decoder  # id -> AddedToken
            self._added = [(t.content, i) for i, t in added.items() if len(t.content) > 1]
        return self._added

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
