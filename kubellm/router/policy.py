"""Which pod serves a request: the routing policy, pure (no I/O), in one replaceable place.

`PrefixAffinity` is consistent hashing with bounded loads (CHWBL, Mirrokni, Thorup and Zadimoghaddam 2018; KubeAI's
`PrefixHash`): requests whose prompts start alike hash to the same point of a ring of virtual nodes, so they reach
the pod whose prefix cache already holds that start, unless that pod carries more than `load_factor` times the
mean load, in which case the walk goes on round the ring to the next pod that does not. Loads come from the
router's own count of open requests and each pod's scraped queue and KV-cache gauges."""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class PodLoad:
    """What the router knows of one pod's load: its own open requests there, and the pod's last scraped gauges
    (None when the scrape is missing or stale)."""

    in_flight: int = 0
    waiting: float | None = None
    running: float | None = None
    kv_usage: float | None = None  # 0-1

    @property
    def load(self) -> float:
        """Requests on the pod: the scraped running + waiting when known (it counts traffic that bypasses this
        router), never less than what this router itself has open there (the scrape lags)."""
        scraped = (self.running or 0.0) + (self.waiting or 0.0)
        return max(float(self.in_flight), scraped)


@dataclass(frozen=True)
class Limits:
    """When a pod counts as saturated: it then takes no new request (all saturated → 429 + Retry-After)."""

    max_waiting: float = 16  # the pod's own queue (kubellm_num_requests_waiting)
    max_in_flight: int = 256  # this router's open requests on the pod
    kv_full: float = 0.98  # KV-cache usage at which a pod with a queue is full

    def saturated(self, p: PodLoad) -> bool:
        if p.in_flight >= self.max_in_flight:
            return True
        waiting = p.waiting or 0.0
        return waiting >= self.max_waiting or (waiting > 0 and (p.kv_usage or 0.0) >= self.kv_full)


@dataclass(frozen=True)
class Choice:
    """Pods to try, best first (retries walk this list), and whether the first is the prompt's own pod on the
    ring (`affinity`) or a spill to another because that one was loaded or saturated."""

    order: list[str]
    affinity: bool


class Policy(Protocol):
    def choose(self, prefix: str, pods: dict[str, PodLoad]) -> Choice: ...


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


@dataclass
class PrefixAffinity:
    """CHWBL over the prompt's leading characters (the router has no tokenizer: characters are what it hashes)."""

    replicas_per_pod: int = 100  # virtual nodes per pod: evens out the share of the ring each pod owns
    load_factor: float = 1.25  # a pod may carry up to this times the mean load (+1) before the walk passes it
    # ... and always this many: an engine batches a few requests at almost no cost, while a spill loses the
    # prefix cache, so at low traffic affinity wins (pure CHWBL would spill a pod's second request)
    min_bound: int = 4
    limits: Limits = field(default_factory=Limits)
    _rings: dict[tuple[str, ...], tuple[list[int], list[str]]] = field(default_factory=dict, repr=False)

    def _ring(self, pods: tuple[str, ...]) -> tuple[list[int], list[str]]:
        ring = self._rings.get(pods)
        if ring is None:
            points = sorted((_hash(f"{pod}#{i}"), pod) for pod in pods for i in range(self.replicas_per_pod))
            ring = ([h for h, _ in points], [p for _, p in points])
            if len(self._rings) > 64:  # pod sets change with scaling; keep the recent ones
                self._rings.clear()
            self._rings[pods] = ring
        return ring

    def walk(self, prefix: str, pods: tuple[str, ...]) -> list[str]:
        """Every pod once, in ring order from the prefix's hash: the affinity order before loads."""
        hashes, owners = self._ring(pods)
        start = bisect.bisect(hashes, _hash(prefix))
        seen: dict[str, None] = {}
        for i in range(len(owners)):
            seen.setdefault(owners[(start + i) % len(owners)])
            if len(seen) == len(pods):
                break
        return list(seen)

    def choose(self, prefix: str, pods: dict[str, PodLoad]) -> Choice:
        if not pods:
            return Choice([], False)
        walk = self.walk(prefix, tuple(sorted(pods)))
        open_ = [p for p in walk if not self.limits.saturated(pods[p])]
        if not open_:
            return Choice([], False)
        total = sum(pods[p].load for p in pods)
        bound = max(self.min_bound, math.ceil(self.load_factor * (total + 1) / len(pods)))
        within = [p for p in open_ if pods[p].load + 1 <= bound]
        order = within + [p for p in open_ if p not in within]
        return Choice(order, order[0] == walk[0])


@dataclass
class LeastLoad:
    """The least-loaded pod first (ties: KV usage, then name): for workloads with no shared prefixes."""

    limits: Limits = field(default_factory=Limits)

    def choose(self, prefix: str, pods: dict[str, PodLoad]) -> Choice:
        open_ = [p for p in pods if not self.limits.saturated(pods[p])]
        order = sorted(open_, key=lambda p: (pods[p].load, pods[p].kv_usage or 0.0, p))
        return Choice(order, False)


POLICIES = {"prefix": PrefixAffinity, "least-load": LeastLoad}


def make_policy(name: str, limits: Limits) -> Policy:
    return POLICIES[name](limits=limits)


def prompt_prefix(body: dict, chars: int) -> str:
    """The request's leading text, as the pods' prefix caches see it, cut at `chars`: for a chat, the messages up
    to and including the first user message (role and text: a conversation's later turns keep its key, so they
    reach the pod holding its earlier turns), else the completion prompt (text, or token ids written out)."""
    return "".join(_prompt_pieces(body))[:chars]


def _prompt_pieces(body: dict):
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            yield f"<{m.get('role', '')}>"
            content = m.get("content")
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield part["text"]
            if m.get("role") == "user":
                break
        return
    for key in ("prompt", "input"):
        prompt = body.get(key)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch: its first prompt
        if isinstance(prompt, str):
            yield prompt
            return
        if isinstance(prompt, list):  # token ids
            yield " ".join(str(t) for t in prompt)
            return


def deletion_cost(p: PodLoad) -> int:
    """A pod's `controller.kubernetes.io/pod-deletion-cost`: its open requests (scraped or this router's), so a
    ReplicaSet scaling down removes idle pods first and busy ones last. Whole requests: small changes in KV
    usage do not rewrite the annotation."""
    return int(round(p.load))
