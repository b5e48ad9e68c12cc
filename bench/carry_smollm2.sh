#!/usr/bin/env bash
# The demo model's GGUF (94 MiB) for the GPU machine, whose calls carry at most 64 MiB: split into two halves,
# .carry-smollm2-a/ and .carry-smollm2-b/ (gitignored), with its sha256. Carry -a (and .wheels, which holds the
# `gguf` reader: bench/fetch_gpu_wheels.sh) in one device call, running any part; ignored paths stay on a warm
# machine between calls, so the next call carries -b alone and `bash bench/gpu_suite.sh spec` joins, checks and
# converts them (kubellm/weights/smollm2.py) when SPEC_MODEL is not given. Run here, from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(.venv/bin/python -c "from kubellm.weights.smollm2 import gguf_path; print(gguf_path())")
rm -rf .carry-smollm2-a .carry-smollm2-b
mkdir -p .carry-smollm2-a .carry-smollm2-b
half=$(( ($(stat -c %s "$src") + 1) / 2 ))
split -b "$half" -d -a 1 "$src" /tmp/smollm2-part-
mv /tmp/smollm2-part-0 .carry-smollm2-a/part
mv /tmp/smollm2-part-1 .carry-smollm2-b/part
sha256sum "$src" | cut -d' ' -f1 > .carry-smollm2-b/sha256
du -sh .carry-smollm2-a .carry-smollm2-b
