"""make_tiny_model: a small random-weight model in the HF layout plus a real byte-level BPE tokenizer with a
chat template, built fully offline. HF transformers loads the result too (it is the reference in tests).
"""

from __future__ import annotations

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")

# Qwen2's split regex: transformers 5.x rebuilds qwen2/qwen3 tokenizers with exactly this pipeline
QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 (one regex)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]  # ids 0..3
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [  # a fixed, offline corpus for the tokenizer
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.",
    "Errors should never pass silently, unless explicitly silenced. Readability counts.",
    "In the face of ambiguity, refuse the temptation to guess. Now is better than never.",
    "Hello world! How are you today? I am fine, thank you. Tell me a story about a dragon.",
    "def main():\n    return sum(x * x for x in range(10))  # Python code\n",
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes schedules pods onto nodes; an operator reconciles custom resources.",
    "Large language models generate text one token at a time from a key-value cache.",
    "Once upon a time, there was a little girl who loved to read books about the sea.",
    "What is the capital of France? The capital of France is Paris.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" @ # $ % ^ & _ ~ `",
]


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = CORPUS * 4
    tok = Tokenizer(models.BPE(unk_token=None))  # byte-level: every byte is in the alphabet, so no unk
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainer=trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        model_max_length=4096,
        model_input_names=["input_ids", "attention_mask"],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_config(
    arch: str, vocab_size: int, *, hidden: int, layers: int, heads: int, kv_heads: int, max_positions: int
):
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        eos_token_id=2,
        pad_token_id=3,
        initializer_range=0.2,  # confident logits: greedy comparisons do not hinge on 1e-6 differences
        rms_norm_eps=1e-6,
    )
    if arch == "llama":  # untied, with llama3 RoPE scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }
        return LlamaConfig(**common, bos_token_id=1, tie_word_embeddings=False, rope_parameters=rope)
    if arch == "mistral":
        return MistralConfig(**common, bos_token_id=1, tie_word_embeddings=False, sliding_window=None)
    if arch == "qwen2":  # q/k/v bias, tied embeddings
        return Qwen2Config(**common, bos_token_id=None, tie_word_embeddings=True, use_sliding_window=False)
    if arch == "qwen3":  # qk-norm, head_dim independent of hidden_size / heads
        return Qwen3Config(**common, bos_token_id=None, tie_word_embeddings=True, head_dim=2 * hidden // heads)
    if arch == "qwen3_moe":  # 8 experts, top 2 renormalized (as Qwen3-30B-A3B: 128, top 8); the last layer dense
        return Qwen3MoeConfig(
            **common,
            bos_token_id=None,
            tie_word_embeddings=True,
            head_dim=2 * hidden // heads,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden // 2,
            norm_topk_prob=True,
            mlp_only_layers=[layers - 1] if layers > 1 else [],
        )
    if arch == "mixtral":  # 4 experts, top 2 (Mixtral-8x7B: 8, top 2), untied
        return MixtralConfig(
            **common, bos_token_id=1, tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2
        )
    raise ValueError(f"--arch must be one of {ARCHITECTURES}, got {arch!r}")


def make_tiny_model(
    out_dir: str,
    arch: str = "llama",
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 2048,
    dtype: str = "float32",
    seed: int = 0,
    extra_vocab: int = 0,
) -> str:
    """extra_vocab: embedding rows beyond the tokenizer's (real checkpoints pad their vocabulary, e.g. Qwen's
    151,936 rows for 151,665 tokens), which also makes the vocabulary split unevenly over ranks."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = build_tokenizer()
    cfg = build_config(
        arch,
        len(tok) + extra_vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        max_positions=max_positions,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=2, pad_token_id=3, do_sample=False, max_new_tokens=16
    )
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
