"""One decoder for Llama (incl. llama3 RoPE scaling), Mistral, Qwen2 (qkv bias), Qwen3 (qk-norm, explicit
head_dim) and the mixture-of-experts Qwen3-MoE and Mixtral (their expert layers in moe.py); GQA throughout.
Parameter names follow HF checkpoints, with q/k/v and gate/up packed. With tensor parallelism each rank builds
its shard: heads and MLP columns divided (sharded.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kubellm.runtime.model import parallel
from kubellm.runtime.model.attention import get_context, paged_attention, write_kv
from kubellm.runtime.model.kernels import use_triton
from kubellm.runtime.model.layers import MergedLinear, RMSNorm, RotaryEmbedding, silu_and_mul
from kubellm.runtime.model.moe import SparseMoeBlock
from kubellm.runtime.model.sharded import ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

SUPPORTED_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"}


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    attention_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    # mixture of experts (0 experts: a dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    dense_layers: tuple[int, ...] = ()  # layers of a MoE model with a dense MLP (Qwen3-MoE's mlp_only_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @classmethod
    def from_hf(cls, cfg) -> ModelShape:
        model_type = cfg.model_type
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        sliding = getattr(cfg, "sliding_window", None)
        if model_type in ("qwen2", "qwen3_moe") and not getattr(cfg, "use_sliding_window", False):
            sliding = None
        return cls(
            model_type=model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            attention_bias=model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            sliding_window=sliding,
            **_moe_fields(cfg),
        )


def _moe_fields(cfg) -> dict:
    if cfg.model_type == "mixtral":  # every layer sparse; the router always renormalizes its top k
        return dict(
            num_experts=cfg.num_local_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.intermediate_size,
            norm_topk_prob=True,
        )
    if cfg.model_type == "qwen3_moe":
        step = cfg.decoder_sparse_step
        dense = {i for i in range(cfg.num_hidden_layers) if (i + 1) % step or i in (cfg.mlp_only_layers or [])}
        return dict(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=bool(cfg.norm_topk_prob),
            dense_layers=tuple(sorted(dense)),
        )
    return {}


class Attention(nn.Module):
    """This rank's attention heads (all of them without tensor parallelism)."""

    def __init__(self, shape: ModelShape, rotary: RotaryEmbedding):
        super().__init__()
        tp = parallel.size()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            shape.num_heads // tp,
            shape.num_kv_heads // tp,
            shape.head_dim,
        )
        self.q_size, self.kv_size = self.num_heads * shape.head_dim, self.num_kv_heads * shape.head_dim
        self.qkv_proj = MergedLinear(shape.hidden_size, [self.q_size, self.kv_size, self.kv_size], shape.attention_bias)
        self.o_proj = RowParallelLinear(shape.num_heads * shape.head_dim, shape.hidden_size)
        if shape.qk_norm:
            self.q_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps)
            self.k_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps)
        self.qk_norm = shape.qk_norm
        self.rotary = rotary
        self.scale = shape.head_dim**-0.5
        self.k_cache = self.v_cache = torch.empty(0)  # views into the runner's KV tensor
        # an FP8 cache holds K / k_scale and V / v_scale (the checkpoint's scales, else 1.0: attention.py)
        self.k_scale = self.v_scale = 1.0

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if use_triton():  # one kernel: q/k norm, rotary, K/V into the cache
            from kubellm.runtime.model.triton_ops import qkv_rope_write

            q = qkv_rope_write(
                qkv,
                positions,
                self.rotary.cos,
                self.rotary.sin,
                self.q_norm.weight if self.qk_norm else None,
                self.k_norm.weight if self.qk_norm else None,
                self.q_norm.eps if self.qk_norm else 0.0,
                self.k_cache,
                self.v_cache,
                get_context().slot_mapping,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                (self.k_scale, self.v_scale),
            )
        else:
            q = self._rope_write(positions, qkv)
        o = paged_attention(q, self.k_cache, self.v_cache, self.scale, self.k_scale, self.v_scale)
        return self.o_proj(o.reshape(-1, self.q_size))

    def _rope_write(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        write_kv(k, v, self.k_cache, self.v_cache, get_context().slot_mapping, self.k_scale, self.v_scale)
        return q


class MLP(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        columns = shape.intermediate_size // parallel.size()
        self.gate_up_proj = MergedLinear(shape.hidden_size, [columns] * 2, bias=False)
        self.down_proj = RowParallelLinear(shape.intermediate_size, shape.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def feed_forward(shape: ModelShape, layer: int) -> nn.Module:
    if not shape.is_moe_layer(layer):
        return MLP(shape)
    return SparseMoeBlock(
        shape.hidden_size,
        shape.num_experts,
        shape.num_experts_per_tok,
        shape.moe_intermediate_size,
        renormalize=shape.norm_topk_prob,
        weights_in_fp32=shape.model_type == "mixtral",
    )


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, rotary: RotaryEmbedding, layer: int):
        super().__init__()
        self.self_attn = Attention(shape, rotary)
        self.mlp = feed_forward(shape, layer)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) → (this layer's MLP output, the residual stream before it): HF's
        `x = x + attn(norm(x)); x = x + mlp(norm(x))` with each add done inside the next norm, where the
        CUDA path fuses it."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, shape: ModelShape, hf_config, max_positions: int):
        super().__init__()
        self.rotary = RotaryEmbedding(hf_config, shape.head_dim, max_positions)
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape, self.rotary, i) for i in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]


class DecoderForCausalLM(nn.Module):
    # HF checkpoint name → (our packed parameter, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, shape: ModelShape, hf_config, max_positions: int):
        super().__init__()
        self.shape = shape
        self.model = DecoderModel(shape, hf_config, max_positions)
        self.lm_head = ParallelLMHead(shape.vocab_size, shape.hidden_size)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """In the model's dtype: the sampler widens them only where a path needs fp32 (the fused sampler reads
        bf16 directly, which saves a [rows, vocab] fp32 copy per step: ~0.1 ms at 256 rows, 128k vocabulary)."""
        return self.lm_head(hidden)
