#!/usr/bin/env bash
# The wheels the GPU machine's image lacks (it has torch, transformers, triton, httpx, prometheus_client):
# pytest for the CUDA tests (.wheels/) and the server's stack for bench/serving.py (.wheels-server/), for
# CPython 3.12 on x86-64 Linux. Both folders are gitignored; pass them in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
get() { python -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
          --implementation cp --no-deps -d "$@"; }
get .wheels pytest pluggy iniconfig packaging pygments llguidance gguf  # gguf: SmolLM2's file (carry_smollm2.sh)
get .wheels-server fastapi starlette uvicorn click h11 anyio idna pydantic pydantic-core pydantic-settings \
    python-dotenv typing-extensions typing-inspection annotated-types annotated-doc \
    aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl
ls .wheels .wheels-server
