"""BlockManager: fixed-size KV blocks with reference counts, a hash-chained prefix cache and a CPU swap pool.

Free blocks keep their hash until they are handed out again (lazy eviction); the free list is ordered
oldest-released first, so the prefix cache evicts least recently used blocks first.

A sequence's block table only ever grows; releasing or moving its blocks assigns a new list. The runner
relies on this to send only new blocks to the device each step.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kubellm.runtime.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept to make prefix hits exact despite hash collisions
    lora_id: int = 0  # the LoRA adapter load its KV was computed with (0: the base model)


def chain_hash(prev_hash: int, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block given the hash of everything before it."""
    return hash((prev_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, num_cpu_blocks: int = 0):
        if num_blocks < 1:
            raise ValueError("the KV cache has no room for a single block; raise the KV budget")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_cpu_blocks = num_cpu_blocks
        self.cpu_free: list[int] = list(range(num_cpu_blocks))
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens found

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ------------------------------------------------------------------ prefix cache
    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """The sequence's chained block hashes for its first num_full_blocks blocks (memoized on the seq)."""
        bs = self.block_size
        hashes = seq.block_hashes
        prev = hashes[-1] if hashes else seq.lora_id  # KV depends on the adapter: each has its own chains
        for i in range(len(hashes), num_full_blocks):
            prev = chain_hash(prev, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            hashes.append(prev)
        return hashes[:num_full_blocks]

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold a prefix of seq; at least one token is always left to compute."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        bs = self.block_size
        for i, h in enumerate(self._hashes(seq, (len(seq) - 1) // bs)):
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.lora_id != seq.lora_id or block.token_ids != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def mark_computed(self, seq: Sequence) -> None:
        """Publish the blocks seq's computed tokens fill completely, so later requests can share them.

        Only computed blocks are published: a block that is merely allocated may never be written (its
        sequence can be preempted before the step runs), and a hit on it would read garbage.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        if full <= seq.num_published_blocks:  # most steps: no block filled up
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_published_blocks, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self.hash_to_block:
                block.hash = hashes[i]
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                block.lora_id = seq.lora_id
                self.hash_to_block[hashes[i]] = block.block_id
        seq.num_published_blocks = full

    # ------------------------------------------------------------------ allocation
    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached content now that it is reused
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash = None
            block.token_ids = None
        block.ref_count = 1
        return block_id

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int] = ()) -> bool:
        """Give seq blocks for num_new_tokens more tokens (after any prefix hit). All or nothing."""
        if not prefix_blocks and seq.block_table:  # a running sequence: most steps fit its last block
            total = seq.num_computed_tokens + num_new_tokens
            if (total + self.block_size - 1) // self.block_size <= len(seq.block_table):
                return True
        reused = sum(1 for b in prefix_blocks if self.blocks[b].ref_count == 0)
        num_computed = seq.num_computed_tokens + len(prefix_blocks) * self.block_size
        needed = self.blocks_for(num_computed + num_new_tokens) - len(seq.block_table) - len(prefix_blocks)
        if needed + reused > len(self.free):
            return False
        if prefix_blocks or (not seq.block_table and seq.num_computed_tokens == 0):
            self.prefix_cache_queries += len(seq)
            self.prefix_cache_hits += len(prefix_blocks) * self.block_size
        for block_id in prefix_blocks:
            self._acquire(block_id)
        seq.block_table.extend(prefix_blocks)
        seq.num_computed_tokens = num_computed
        if prefix_blocks:
            seq.num_cached_tokens = num_computed
        seq.block_table.extend(self._take_free_block() for _ in range(max(needed, 0)))
        return True

    def free_seq(self, seq: Sequence) -> None:
        """Release every block seq holds (GPU and CPU). Tail blocks go back first so they are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # nothing worth keeping: reuse it before cached blocks
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_published_blocks = 0
        self.cpu_free.extend(seq.cpu_block_table)
        seq.cpu_block_table = []

    # ------------------------------------------------------------------ swapping
    def can_swap_out(self, seq: Sequence) -> bool:
        return len(self.cpu_free) >= len(seq.block_table)

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move seq's KV to the CPU pool; returns (gpu_block, cpu_block) copies the runner must do first."""
        cpu_blocks = [self.cpu_free.pop() for _ in seq.block_table]
        mapping = list(zip(seq.block_table, cpu_blocks))
        self.free_seq(seq)
        seq.cpu_block_table = cpu_blocks
        return mapping

    def can_swap_in(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_for(seq.num_computed_tokens + num_new_tokens) <= len(self.free)

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Bring seq's KV back from the CPU pool; returns (cpu_block, gpu_block) copies."""
        gpu_blocks = [self._take_free_block() for _ in seq.cpu_block_table]
        mapping = list(zip(seq.cpu_block_table, gpu_blocks))
        self.cpu_free.extend(seq.cpu_block_table)
        seq.cpu_block_table = []
        seq.block_table = gpu_blocks
        seq.num_published_blocks = 0
        self.mark_computed(seq)
        return mapping

    # ------------------------------------------------------------------ invariants (tests)
    def check_invariants(self, live: list[Sequence]) -> None:
        """Every block's reference count equals the number of live sequences holding it."""
        counts = [0] * self.num_blocks
        cpu_held = []
        for seq in live:
            for block_id in seq.block_table:
                counts[block_id] += 1
            cpu_held.extend(seq.cpu_block_table)
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], (
                f"block {block.block_id}: {block.ref_count} != {counts[block.block_id]}"
            )
            assert (block.ref_count == 0) == (block.block_id in self.free), f"block {block.block_id} free-list mismatch"
        assert sorted(cpu_held + self.cpu_free) == list(range(self.num_cpu_blocks)), "CPU swap pool leaked"
