"""Mixture-of-experts feed-forward (Qwen3-MoE, Mixtral): a router picks each token's top-k experts, each expert
is a SiLU-gated MLP, and the token's output is the routing-weighted sum of its experts' outputs.

The experts' weights are stacked per layer (w13: [experts, 2·intermediate, hidden], gate rows then up rows;
w2: [experts, hidden, intermediate]), filled from the per-expert tensors of HF checkpoints
(`mlp.experts.{e}.gate_proj/up_proj/down_proj` for Qwen3-MoE, `block_sparse_moe.experts.{e}.w1/w3/w2` for
Mixtral). With tensor parallelism every rank holds every expert, split over the intermediate dimension (as the
dense MLP is), and the partial outputs are summed with one all-reduce.

Two implementations: the torch path computes exactly what HF transformers computes (expert by expert in
ascending order, the same casts), and on the CUDA path one Triton grouped GEMM per projection runs all the
experts at once without a host sync (triton_moe.py), so that decode steps can be captured in CUDA graphs.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.runtime.model import parallel
from kubellm.runtime.model.kernels import use_triton
from kubellm.runtime.model.sharded import load_shard

# an expert's tensor in an HF checkpoint: (layer's MoE block, expert, projection)
EXPERT_WEIGHT = re.compile(
    r"^(.*)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
# projection → (our stacked parameter, which half of w13: 0 gate, 1 up; None for w2)
PROJECTIONS = {
    "gate_proj": ("w13", 0),
    "w1": ("w13", 0),
    "up_proj": ("w13", 1),
    "w3": ("w13", 1),
    "down_proj": ("w2", None),
    "w2": ("w2", None),
}


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, weights_in_fp32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids), both [tokens, top_k]: softmax over the experts in fp32, the top k, renormalized to
    sum to one when the model does. Mixtral keeps the weights in fp32; Qwen3-MoE rounds them to the model's
    dtype (as their HF routers do)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    if not weights_in_fp32:
        weights = weights.to(router_logits.dtype)
    return weights, ids


class FusedExperts(nn.Module):
    """This rank's part of every expert: w13 [E, 2·I/tp, H] and w2 [E, H, I/tp]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.columns = intermediate_size // parallel.size()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.columns, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.columns))

    def load_expert(self, source, expert: int, projection: str) -> str:
        """Copy this rank's part of one expert's checkpoint tensor (a safetensors slice); returns the key the
        loader records, as `checkpoint_keys` lists them."""
        param, half = PROJECTIONS[projection]
        if half is None:
            load_shard(self.w2.data[expert], source, 1)
        else:
            load_shard(self.w13.data[expert].narrow(0, half * self.columns, self.columns), source, 0)
        return f"{param}#{expert}.{half}"

    def checkpoint_keys(self) -> set[str]:
        return {f"w13#{e}.{h}" for e in range(self.num_experts) for h in (0, 1)} | {
            f"w2#{e}.None" for e in range(self.num_experts)
        }

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if use_triton():
            from kubellm.runtime.model.triton_moe import fused_moe

            return fused_moe(x, self.w13, self.w2, weights, ids)
        return self._forward_torch(x, weights, ids)

    def _forward_torch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """HF's loop: each expert that some token chose, in ascending order, on the rows that chose it."""
        out = torch.zeros_like(x)
        hit = torch.zeros(self.num_experts, dtype=torch.bool, device=x.device)
        hit[ids.flatten()] = True
        for expert in hit.nonzero().flatten().tolist():
            token, slot = torch.where(ids == expert)
            gate, up = F.linear(x[token], self.w13[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[expert]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated on every rank) + experts; its output is summed over tensor-parallel ranks."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        weights_in_fp32: bool,
    ):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size)
        self.top_k, self.renormalize, self.weights_in_fp32 = top_k, renormalize, weights_in_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize, self.weights_in_fp32)
        return parallel.all_reduce(self.experts(x, weights, ids))
