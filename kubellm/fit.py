"""The fit check: will a model fit its devices? An estimate from the model's config.json alone — weights, the KV
cache of one full-length sequence, and overhead — per device, against the memory the engine may use
(device memory × gpu_memory_utilization). Standard library only, like kubellm.settings: `kubellm serve`
refuses to start with it (runtime/engine/runner.py: check_fit) and the operator can call the same function
before any pod starts, from a config it can read and the GPU's memory of the node (the GPU feature
discovery label nvidia.com/gpu.memory, in MiB).

A refusal at start ends `kubellm serve` with EXIT_CODE and writes termination_message(...) (one JSON object:
reason, message, the numbers) to the container's termination-message file, where the operator reads it from
the pod's status (lastState.terminated.message) and stops the restart loop.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass

REASON = "InsufficientGPUMemory"
EXIT_CODE = 78  # sysexits' EX_CONFIG: the configuration cannot work; distinct from a crash (1) or a kill (137)
TERMINATION_MESSAGE_PATH = "/dev/termination-log"  # Kubernetes' default terminationMessagePath
GIB = 1 << 30
DEFAULT_OVERHEAD_BYTES = 512 << 20  # CUDA context, allocator slack, kernels' workspaces (measured: ~0.4–0.6 GiB)

_DTYPE_BYTES = {
    **{"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "fp8": 1, "float8_e4m3fn": 1},
    **{"fp8_e4m3": 1, "fp8_e5m2": 1},  # the other --kv-cache-dtype values
}


@dataclass(frozen=True)
class FitEstimate:
    """Bytes per device (one tensor-parallel rank)."""

    weights_bytes: int
    kv_bytes: int  # the KV cache of one max_model_len-token sequence
    overhead_bytes: int  # activations of the largest step, logits, and the fixed overhead
    device_memory_bytes: int
    gpu_memory_utilization: float
    tensor_parallel_size: int
    max_model_len: int

    @property
    def needed_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def usable_bytes(self) -> int:
        return int(self.device_memory_bytes * self.gpu_memory_utilization)

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.usable_bytes

    def message(self) -> str:
        b = human_bytes
        return (
            f"the model does not fit: weights {b(self.weights_bytes)} + KV cache of one {self.max_model_len}-token "
            f"sequence {b(self.kv_bytes)} + overhead {b(self.overhead_bytes)} = {b(self.needed_bytes)} per device "
            f"(tensor_parallel_size {self.tensor_parallel_size}), more than the {b(self.usable_bytes)} usable "
            f"({self.gpu_memory_utilization:g} of {b(self.device_memory_bytes)}); raise tensor_parallel_size, lower "
            f"max_model_len, or use devices with more memory"
        )


def human_bytes(n: int) -> str:
    """GiB with two decimals, or MiB / KiB below a GiB / MiB: a small budget must not read as 0.00 GiB."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.2f} KiB"


class DoesNotFit(RuntimeError):
    """The engine refuses to start: the estimate says the model cannot fit."""

    reason = REASON

    def __init__(self, estimate: FitEstimate):
        super().__init__(estimate.message())
        self.estimate = estimate


def text_config(cfg: dict) -> dict:
    """The language model's part of a config.json (a multimodal model nests it under text_config)."""
    return cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg


# every config.json key the estimate reads (the cache Job reports these; the termination message holds 4 KiB)
FIT_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_experts",
    "num_local_experts",
    "tie_word_embeddings",
    "max_position_embeddings",
    "torch_dtype",
    "dtype",
)
_QUANT_KEYS = ("quant_method", "bits")


def fit_config(config: dict) -> dict:
    """The part of a config.json the estimate reads (the same estimate from it as from the whole file)."""
    cfg = text_config(config)
    out = {k: cfg[k] for k in FIT_KEYS if cfg.get(k) is not None}
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict):
        out["quantization_config"] = {k: quant[k] for k in _QUANT_KEYS if k in quant}
    return out


def read_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return text_config(json.load(f))


def dtype_bytes(config: dict, dtype: str = "auto") -> int:
    """Bytes per weight for the engine's dtype setting ("auto": the checkpoint's)."""
    name = dtype
    if dtype == "auto":
        name = config.get("torch_dtype") or config.get("dtype") or "float32"
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}")
    return _DTYPE_BYTES[name]


def _linear_weight_bytes(config: dict, default: int, quantization: str | None, fp8_matmuls: bool) -> float:
    """Bytes per weight of the linear layers: quantized checkpoints store less than their dtype, and FP8 weights
    stay FP8 on the GPUs with FP8 matmuls (kubellm/runtime/model/fp8.py); elsewhere they are held dequantized,
    in the model's dtype."""
    quant = config.get("quantization_config") or {}
    method = str(quant.get("quant_method", "")).lower()
    if method in ("fp8", "compressed-tensors") or quantization == "fp8":
        return 1 if fp8_matmuls else default
    if method in ("awq", "gptq") and quant.get("bits"):
        return quant["bits"] / 8
    return default


def parameter_counts(config: dict) -> tuple[int, int, int]:
    """(embedding + LM head, linear layers of the decoder, norms) parameter counts of a decoder-only
    transformer config (Llama, Mistral, Qwen2/3 and their MoE variants)."""
    hidden = config["hidden_size"]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    vocab = config["vocab_size"]
    embed = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    if experts:
        expert_size = config.get("moe_intermediate_size") or config["intermediate_size"]
        shared = config.get("shared_expert_intermediate_size") or 0
        mlp = experts * 3 * hidden * expert_size + hidden * experts + 3 * hidden * shared
    else:
        mlp = 3 * hidden * config["intermediate_size"]
    norms = layers * (2 * hidden + 2 * head_dim) + hidden
    return embed, layers * (attention + mlp), norms


def estimate(
    config: dict,
    device_memory_bytes: int,
    *,
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.9,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
    kv_cache_dtype: str | None = None,
    quantization: str | None = None,
    fixed_overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
    fp8_matmuls: bool = True,
) -> FitEstimate:
    """The per-device estimate for a model's config.json (a dict) and the serving settings (`kubellm serve`'s
    names; max_model_len None: the model's own). fp8_matmuls: whether the device keeps FP8 weights as FP8 (Ada,
    Hopper and later; unknown before the pod has its GPU, so the operator assumes so and the runtime knows)."""
    tp = tensor_parallel_size
    elem = dtype_bytes(config, dtype)
    embed, linear, norms = parameter_counts(config)
    weights = (
        embed * elem + linear * _linear_weight_bytes(config, elem, quantization, fp8_matmuls)
    ) / tp + norms * elem
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    length = max_model_len or config.get("max_position_embeddings") or 2048
    kv_elem = _DTYPE_BYTES[kv_cache_dtype] if kv_cache_dtype and kv_cache_dtype != "auto" else elem
    kv = 2 * layers * max(kv_heads // tp, 1) * head_dim * length * kv_elem
    # the largest step's activations: hidden states and the MLP's widest intermediate for every token, and
    # fp32 logits for every sampled row
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    tokens = min(max_num_batched_tokens, max(length, 1))
    activations = tokens * (4 * hidden + 3 * inter // tp) * elem + min(max_num_seqs, tokens) * config["vocab_size"] * 4
    return FitEstimate(
        int(weights),
        int(kv),
        int(activations + fixed_overhead_bytes),
        int(device_memory_bytes),
        gpu_memory_utilization,
        tp,
        length,
    )


GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # GPU feature discovery's node label: one GPU's memory in MiB
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # its product name, e.g. NVIDIA-A100-SXM4-80GB, Tesla-T4
# products before compute capability 8.9, which have no FP8 tensor cores (Ampere, Turing, Volta, Pascal, Kepler)
_NO_FP8 = re.compile(
    r"(^|-)(A100|A800|A10G?|A16|A2|A30|A40|V100S?|T4|P100|P40|P4|K80|M60|RTX-A\d+|RTX-[23]0\d\d\w*)(-|$)"
)


def node_fp8_matmuls(labels: dict[str, str]) -> bool:
    """Whether a node's GPUs keep FP8 weights as FP8: False only for a product known to lack FP8 matmuls (an
    unlabelled node or an unknown product may have them: a pre-start check must not refuse what could fit)."""
    return not _NO_FP8.search((labels or {}).get(GPU_PRODUCT_LABEL, ""))


def node_gpu_memory_bytes(labels: dict[str, str]) -> int | None:
    """One GPU's memory on a node, from its GPU feature discovery label (None: unlabelled or unreadable)."""
    value = (labels or {}).get(GPU_MEMORY_LABEL, "")
    return int(value) << 20 if value.isdigit() and int(value) > 0 else None


def termination_message(estimate: FitEstimate) -> str:
    """What `kubellm serve` writes to the termination-message file when it refuses (Kubernetes keeps 4 KiB)."""
    numbers = asdict(estimate) | {"needed_bytes": estimate.needed_bytes, "usable_bytes": estimate.usable_bytes}
    return json.dumps({"reason": REASON, "message": estimate.message(), **numbers}, separators=(",", ":"))


def parse_termination_message(text: str) -> dict | None:
    """The operator's side: the refusal's fields, or None for a message that is not one."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("reason") == REASON else None


def write_termination_message(text: str, path: str | None = None) -> bool:
    """Write the message where Kubernetes reads it (KUBELLM_TERMINATION_MESSAGE_PATH, else its default); False
    when there is no such file to write (outside a pod)."""
    path = path or os.environ.get("KUBELLM_TERMINATION_MESSAGE_PATH", TERMINATION_MESSAGE_PATH)
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        return False
    return True
