"""Layers split over the tensor-parallel group (Megatron-style): attention heads and MLP columns divided among
ranks, the two row-parallel projections (o_proj, down_proj) summing their partial products with an all-reduce,
the embedding and LM head split over the vocabulary; and the loader's copy of a rank's part of a tensor."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kubellm.runtime.model import fp8, parallel


def load_shard(dest: torch.Tensor, source, dim: int | None) -> None:
    """Copy this rank's part of a checkpoint tensor (`source`: a safetensors slice, read only where indexed):
    rows (or columns) rank·n … rank·n + n-1 of `dim`, n = dest's size there; the last vocabulary shard may be
    short (the rest of dest is padding). dim None: the whole tensor (replicated)."""
    shape = source.get_shape()
    if dim is None:
        dest.copy_(source[:])
        return
    n = dest.shape[dim]
    if -(-shape[dim] // parallel.size()) != n:
        raise ValueError(
            f"checkpoint tensor of shape {tuple(shape)} does not fit {tuple(dest.shape)} "
            f"on each of {parallel.size()} rank(s)"
        )
    start = parallel.rank() * n
    length = max(min(n, shape[dim] - start), 0)
    index = [slice(None)] * len(shape)
    index[dim] = slice(start, start + length)
    dest.narrow(dim, 0, length).copy_(source[tuple(index)])


# A module's `tp_dim`: the dimension of its weight that is split over ranks (the loader reads it).
class RowParallelLinear(nn.Linear):
    """y = x W^T over this rank's input columns, summed over ranks (o_proj, down_proj)."""

    tp_dim = 1

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features // parallel.size(), out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return parallel.all_reduce(fp8.linear(x, self))


class VocabParallelEmbedding(nn.Module):
    """Rows rank·n … rank·n + n-1 of the embedding; each rank looks up its own ids, the others add zeros."""

    tp_dim = 0

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // parallel.size())
        self.start = parallel.rank() * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if parallel.size() == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.start + self.rows)
        x = F.embedding((ids - self.start) * mine, self.weight)
        return parallel.all_reduce(x.masked_fill_(~mine[:, None], 0))


class ParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary rows, gathered so every rank holds the whole row (the same bits)."""

    tp_dim = 0

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(-(-vocab_size // parallel.size()), hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if parallel.size() == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(parallel.size())]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]
