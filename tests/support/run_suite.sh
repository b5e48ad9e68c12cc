#!/usr/bin/env bash
# run_suite.sh — the whole suite, `make test`: every tier, with the slow builds overlapped. The Go binaries and
# images that only the cluster and node tiers need (k8s-bins, then node-setup: most of a cold CI's build time,
# nothing when cached) build in the background at low priority while the unit and e2e tiers run, so they take
# the CPU those tests leave idle (process start-ups, servers waiting on sockets) instead of running first; the
# cluster tier starts once the control plane's binaries exist, the node tier once node-setup is done. Each step
# prints its time as a `[make] ...` line (.ci/run collects them); any tier failing, or collecting nothing, fails.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
work="$(mktemp -d)"
setsid bash -c "nice -n 10 make -s k8s-bins && touch '$work/k8s-bins' && nice -n 10 make -s node-setup && touch '$work/node-setup'" \
  >"$work/builds.log" 2>&1 &
builder=$!
trap 'kill -- -$builder 2>/dev/null; rm -rf "$work"' EXIT

await() {  # await STEP: 0 once the background step is done, 1 (with the build log) if the builds stopped short of it
  local t=$SECONDS
  until [[ -e "$work/$1" ]]; do
    if ! kill -0 "$builder" 2>/dev/null && [[ ! -e "$work/$1" ]]; then
      echo "[make] $1 failed:"; cat "$work/builds.log"; return 1
    fi
    sleep 2
  done
  echo "[make] waited for $1: $((SECONDS - t))s"
}

tier() {  # tier NAME MARKER-EXPRESSION
  local t=$SECONDS rc
  "$PY" -m pytest -ra --durations=15 -m "$2"
  rc=$?
  echo "[make] pytest $1: $((SECONDS - t))s (exit $rc)"
  return "$rc"
}

start=$SECONDS
rc=0
tier "unit+e2e" "not cluster and not node" || rc=1
if await k8s-bins; then tier cluster "cluster" || rc=1; else rc=1; fi
if await node-setup; then tier node "node" || rc=1; else rc=1; fi
grep -E '^\[(make|node-setup)\]' "$work/builds.log"
echo "[make] pytest (all tiers, builds overlapped): $((SECONDS - start))s"
exit "$rc"
