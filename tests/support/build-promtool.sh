#!/usr/bin/env bash
# promtool (Prometheus' rule and query checker) built from its Go module once and cached by version; prints the
# binary's path. Used by tests/unit/test_observability.py to check the dashboard's and the alert rules' PromQL
# and to run `promtool test rules`. ~8 min cold on the 2-core machine (the module graph is large).
set -euo pipefail
VERSION="${PROMETHEUS_MODULE_VERSION:-v0.316.0}"  # Prometheus 3.x's Go module version
OUT="${KUBELLM_PROMTOOL_CACHE:-$HOME/.cache/promtool-bin}/$VERSION"
if [[ -x "$OUT/promtool" ]]; then echo "$OUT/promtool"; exit 0; fi
mkdir -p "$OUT"
export GOPROXY="${GOPROXY_OVERRIDE:-https://proxy.golang.org}" GOFLAGS=-mod=mod CGO_ENABLED=0
GOBIN="$OUT" go install -trimpath -ldflags="-s -w" "github.com/prometheus/prometheus/cmd/promtool@$VERSION" >&2
echo "$OUT/promtool"
