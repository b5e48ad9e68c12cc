#!/usr/bin/env bash
# build-node-bins.sh — kubelet and kube-proxy (same Kubernetes version and recipe as build-k8s-bins.sh: Go
# modules only, static, staging modules replaced), or with --helm the helm v3 CLI; each cached in its own
# directory (so the control-plane cache stays valid); prints the directory on stdout.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-1.36.3}"
HELM_VERSION="${HELM_VERSION:-3.22.0}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}"
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="" GOSUMDB="${GOSUMDB:-off}"
export GOPROXY="${GOPROXY_OVERRIDE:-https://proxy.golang.org}"
START=$SECONDS
step() { echo "[build-node-bins +$((SECONDS - START))s] $*" >&2; }

if [[ "${1:-}" == --helm ]]; then
  OUT="$CACHE/helm-bin/v${HELM_VERSION}"
  if [[ -f "$OUT/.complete" ]]; then echo "$OUT"; exit 0; fi
  mkdir -p "$OUT"
  step "building helm v${HELM_VERSION}"
  GOBIN="$OUT" go install -trimpath -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=v${HELM_VERSION}" \
    "helm.sh/helm/v3/cmd/helm@v${HELM_VERSION}"
  "$OUT/helm" version --short >&2
  touch "$OUT/.complete"; echo "$OUT"; exit 0
fi

OUT="$CACHE/k8s-test-bins/node-k${KUBE_VERSION}"
if [[ -f "$OUT/.complete" ]]; then echo "$OUT"; exit 0; fi
mkdir -p "$OUT"
WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
step "resolving k8s.io/kubernetes v${KUBE_VERSION}"
UPSTREAM_GOMOD="$(cd "$WORK" && go mod download -json "k8s.io/kubernetes@v${KUBE_VERSION}" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
mkdir -p "$WORK/kube"; cd "$WORK/kube"
TOOLS="k8s.io/kubernetes/cmd/kubelet
	k8s.io/kubernetes/cmd/kube-proxy"
cat > go.mod <<GOMOD
module local.invalid/nodebins

go 1.26.0

tool (
	$TOOLS
)

require k8s.io/kubernetes v${KUBE_VERSION}
GOMOD
go mod edit -json "$UPSTREAM_GOMOD" > upstream-gomod.json
STAGING_VERSION="v0.${KUBE_VERSION#1.}" python3 - <<'PY'
import json, os, subprocess
m = json.load(open("upstream-gomod.json"))
sv = os.environ["STAGING_VERSION"]
staging = {r["Path"] for r in (m.get("Require") or [])
           if r["Path"].startswith("k8s.io/") and r["Version"] == "v0.0.0"}
staging |= {r["Old"]["Path"] for r in (m.get("Replace") or [])
            if r["New"]["Path"].startswith("./staging/")}
args = [f"-replace={p}={p}@{sv}" for p in sorted(staging)]
for r in (m.get("Replace") or []):
    new, old = r["New"], r["Old"]
    if new["Path"].startswith("./staging/"):
        continue
    if new.get("Version"):
        o = old["Path"] + (("@" + old["Version"]) if old.get("Version") else "")
        args.append(f"-replace={o}={new['Path']}@{new['Version']}")
subprocess.run(["go", "mod", "edit", *args], check=True)
PY
step "go mod tidy"
go mod tidy >&2
KMINOR="$(cut -d. -f2 <<<"$KUBE_VERSION")"
LDFLAGS="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDFLAGS+=" -X $p.gitVersion=v${KUBE_VERSION} -X $p.gitMajor=1 -X $p.gitMinor=${KMINOR}"
  LDFLAGS+=" -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.gitTreeState=clean"
  LDFLAGS+=" -X $p.buildDate=1970-01-01T00:00:00Z"
done
step "compiling kubelet, kube-proxy"
# shellcheck disable=SC2086
go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags="$LDFLAGS" -o "$OUT/" $TOOLS
"$OUT/kubelet" --version >&2
step "done"
touch "$OUT/.complete"
echo "$OUT"
