"""Paged-cache fixtures for the attention kernel tests: contexts scattered over shuffled cache blocks."""

from __future__ import annotations

import torch


def shuffled_block_tables(context_lens: list[int], block_size: int, num_blocks: int, width: int = 20) -> torch.Tensor:
    """[sequences, width] block tables giving each context its own blocks, in random order, padded with 0."""
    perm = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for n in context_lens:
        count = (n + block_size - 1) // block_size
        tables.append(perm[used : used + count] + [0] * (width - count))
        used += count
    return torch.tensor(tables)
