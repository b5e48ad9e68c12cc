#!/usr/bin/env bash
# build-k8s-bins.sh — etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok
# from Go modules (Go module proxy only) into a cache dir; prints the dir on stdout.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-1.36.3}"     # k8s.io/kubernetes tag (without the v)
ETCD_VERSION="${ETCD_VERSION:-3.6.14}"     # go.etcd.io/etcd/server/v3 tag
KWOK_VERSION="${KWOK_VERSION:-0.8.0}"      # sigs.k8s.io/kwok tag
WITH_KUBECTL="${WITH_KUBECTL:-1}"
OUT="${K8S_TEST_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/k8s-test-bins/k${KUBE_VERSION}-etcd${ETCD_VERSION}-kwok${KWOK_VERSION}}"

if [[ -f "$OUT/.complete" ]]; then echo "$OUT"; exit 0; fi
mkdir -p "$OUT"

export CGO_ENABLED=0          # upstream builds these binaries static (hack/lib/golang.sh)
export GOTOOLCHAIN=local      # never try to download another toolchain
export GOFLAGS=""             # ignore inherited -mod=... etc.
export GOSUMDB="${GOSUMDB:-off}"   # sum.golang.org is not reachable from our machines; the proxy is
export GOPROXY="${GOPROXY_OVERRIDE:-https://proxy.golang.org}"  # never fall back to git (no network)
START=$SECONDS
step() { echo "[build-k8s-bins +$((SECONDS - START))s] $*" >&2; }
WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT

gomod_json() {  # $1 = module@version -> JSON of `go mod download -json`, run outside any module
  (cd "$WORK" && go mod download -json "$1")
}

# ---------------------------------------------------------------- Kubernetes
step "resolving k8s.io/kubernetes v${KUBE_VERSION}"
UPSTREAM_GOMOD="$(gomod_json "k8s.io/kubernetes@v${KUBE_VERSION}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
mkdir -p "$WORK/kube"; cd "$WORK/kube"
TOOLS="k8s.io/kubernetes/cmd/kube-apiserver
	k8s.io/kubernetes/cmd/kube-controller-manager
	k8s.io/kubernetes/cmd/kube-scheduler"
[[ "$WITH_KUBECTL" == 1 ]] && TOOLS="$TOOLS
	k8s.io/kubernetes/cmd/kubectl"
cat > go.mod <<GOMOD
module local.invalid/kubebins

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
for r in (m.get("Replace") or []):          # mirror any versioned non-staging pin
    new, old = r["New"], r["Old"]
    if new["Path"].startswith("./staging/"):
        continue
    if new.get("Version"):
        o = old["Path"] + (("@" + old["Version"]) if old.get("Version") else "")
        args.append(f"-replace={o}={new['Path']}@{new['Version']}")
    else:
        print("WARNING: upstream has a local replace that cannot be mirrored:", r)
subprocess.run(["go", "mod", "edit", *args], check=True)
print(f"{len(staging)} staging modules replaced with {sv}")
PY
step "go mod tidy (kubernetes)"
go mod tidy >&2

KMINOR="$(cut -d. -f2 <<<"$KUBE_VERSION")"
LDFLAGS="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDFLAGS+=" -X $p.gitVersion=v${KUBE_VERSION} -X $p.gitMajor=1 -X $p.gitMinor=${KMINOR}"
  LDFLAGS+=" -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.gitTreeState=clean"
  LDFLAGS+=" -X $p.buildDate=1970-01-01T00:00:00Z"
done
step "compiling kubernetes binaries"
# shellcheck disable=SC2086
go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags="$LDFLAGS" -o "$OUT/" $TOOLS

# ---------------------------------------------------------------------- etcd
step "building etcd v${ETCD_VERSION}"
mkdir -p "$WORK/etcd/cmd/etcd"; cd "$WORK/etcd"
cat > go.mod <<GOMOD
module local.invalid/etcdbin

go 1.26.0

require go.etcd.io/etcd/server/v3 v${ETCD_VERSION}
GOMOD
cat > cmd/etcd/main.go <<'GO'
// Same as go.etcd.io/etcd/server/v3/main.go; wrapped because the etcd server
// module's own go.mod has replace directives, which `go install m@v` refuses.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
go mod tidy >&2
go build -trimpath -ldflags="-s -w" -o "$OUT/etcd" ./cmd/etcd

# ---------------------------------------------------------------------- kwok
step "building kwok v${KWOK_VERSION}"
GOBIN="$OUT" go install -trimpath -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/kwok@v${KWOK_VERSION}"
KWOK_DIR="$(gomod_json "sigs.k8s.io/kwok@v${KWOK_VERSION}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
{
  sep=""
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    printf '%s' "$sep"; cat "$KWOK_DIR/kustomize/stage/$f"; echo; sep=$'---\n'
  done
} > "$OUT/kwok-stages.yaml"

"$OUT/kube-apiserver" --version >&2      # expect: Kubernetes v1.36.3
"$OUT/etcd" --version >&2                # expect: etcd Version: 3.6.14
"$OUT/kwok" --version >&2                # expect: v0.8.0 go1.26.8 (linux/amd64)
step "done"
touch "$OUT/.complete"
echo "$OUT"
