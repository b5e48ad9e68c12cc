#!/usr/bin/env bash
# Install kubellm with the given extras into PYTHON's environment. One script for `make setup` (and so CI)
# and for both Dockerfiles, so CI proves what the images run.
#   scripts/install.sh PYTHON EXTRAS [editable]
# --compile-bytecode: write the .pyc files now. Nothing writes them later where it matters: the runtime pod's
# root filesystem is read-only, and PYTHONDONTWRITEBYTECODE is often set (it is on our build machine); without them every
# process compiles torch and transformers from source at start (~2–5 s each on 2 cores).
set -euo pipefail
python=${1:?usage: install.sh PYTHON EXTRAS [editable]}
extras=${2:?usage: install.sh PYTHON EXTRAS [editable]}
host=${HOST_PYTHON:-python3}
"$host" -m uv --version >/dev/null 2>&1 || "$host" -m pip install -q --no-cache-dir uv
if [[ "${3:-}" == editable ]]; then
  "$host" -m uv pip install -q --compile-bytecode --python "$python" -e ".[${extras}]"
else
  "$host" -m uv pip install -q --compile-bytecode --no-cache --python "$python" ".[${extras}]"
fi
