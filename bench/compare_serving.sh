#!/usr/bin/env bash
# Serving speed of this checkout against an older commit, on the emulated device: alternating runs of
#   python bench/serving.py --model MODEL --stand-in --concurrency 256
# on each tree (the older one in a temporary git worktree), so drifts in machine load hit both alike.
#   bash bench/compare_serving.sh OLD_REF [ROUNDS=4] [MODEL=~/.cache/kubellm/bench-models/qwen3-tiny-wordlevel]
# Trees older than f66c367 lose the step pipe under load (uvloop leaves its read end non-blocking); that fix is
# applied to the old tree's copy before the runs. Run it on an otherwise idle machine.
set -euo pipefail
old_ref=$1
rounds=${2:-4}
model=${3:-$HOME/.cache/kubellm/bench-models/qwen3-tiny-wordlevel}
here=$(cd "$(dirname "$0")/.." && pwd)
py=$here/.venv/bin/python
old=$(mktemp -d /tmp/kubellm-old.XXXXXX)
git -C "$here" worktree add -q --detach "$old" "$old_ref"
trap 'git -C "$here" worktree remove --force "$old"' EXIT
engine=$old/kubellm/runtime/engine/async_engine.py
# the client's heap out of the garbage collector's reach before the run, as in this checkout's bench/serving.py
# (a full collection inside the run pauses every stream's client; older clients did not do this)
client=$old/bench/serving.py
if ! grep -q "gc.freeze" "$client"; then
  sed -i 's/^\( *\)r = asyncio.run(run(args, prompts, out_lens))$/\1import gc; gc.collect(); gc.freeze()\n&/' "$client"
fi
if ! grep -q set_blocking "$engine"; then
  sed -i 's/^\( *\)self._loop.add_reader(self._outbox.fileno(), self._on_messages)$/&\n\1import os; os.set_blocking(self._outbox.fileno(), True)/' "$engine"
fi
for i in $(seq "$rounds"); do
  for tree in "$old" "$here"; do
    name=new; [ "$tree" = "$old" ] && name="old ($old_ref)"
    echo "=== round $i, $name, $(date +%T)"
    (cd "$tree" && PYTHONPATH=$tree "$py" bench/serving.py --model "$model" --stand-in --concurrency 256 \
      --port $((8120 + i)) 2>&1 | grep -E '^\| concurrency|CPU µs')
  done
done
