#!/usr/bin/env bash
# node-setup.sh — what the `node` test tier and `make demo` need on this host to run real pods: Debian packages,
# the two host fixes, kubelet + kube-proxy + helm (build-node-bins.sh), a local base image, the pause image and
# both project images built from the project's Dockerfiles with podman. Idempotent and cached; needs root;
# changes the host (packages, /etc/containers/containers.conf, a cgroup mount): `make node-clean` undoes the
# runtime state, the README lists what stays. Step timings on stderr; the last lines on stdout are KEY=VALUE
# (also written to $STATE/node.env) for the test fixture.
#
# The recipe and the host quirks it works around: ../shared/reference/real-node/README.md (§2-§4).
set -euo pipefail
shopt -s inherit_errexit
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CONTEXT="${KUBELLM_NODE_CONTEXT:-$REPO}"   # the images' build context: this checkout (another: e.g. a clean worktree)
STATE="${KUBELLM_NODE_STATE:-/var/lib/kubellm-node}"   # containerd root, the imported-image markers, models
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/kubellm-node"    # base image tarball, pause binary
START=$SECONDS
step() { echo "[node-setup +$((SECONDS - START))s] $*" >&2; }
timed() {  # timed NAME CMD...: run, then print NAME's own time
  local t=$SECONDS; "${@:2}"; echo "[node-setup] $1: $((SECONDS - t))s" >&2
}
die() { echo "node-setup: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (it installs packages, mounts a cgroup hierarchy and runs containerd/kubelet)"
[[ -d /sys/fs/cgroup ]] || die "no /sys/fs/cgroup: this machine cannot run containers"
mkdir -p "$STATE" "$CACHE"

# ------------------------------------------------------------------ packages
PKGS=(podman crun mmdebstrap containerd runc containernetworking-plugins iptables conntrack uidmap
      golang-github-containers-common catatonit fuse-overlayfs slirp4netns)
packages() {
  local missing=()
  for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "no apt-get: install ${missing[*]} by hand"
    step "apt-get install ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
timed packages packages

# ---------------------------------------------------------------- host fixes
host_fixes() {
  # 1. A VM without CAP_SYS_RESOURCE cannot raise RLIMIT_NOFILE/NPROC to podman's defaults (crun: setrlimit EPERM).
  #    Harmless where the capability exists, so set unconditionally.
  if ! grep -q "^default_ulimits" /etc/containers/containers.conf 2>/dev/null; then
    mkdir -p /etc/containers
    printf '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n' \
      >> /etc/containers/containers.conf
    step "containers.conf: default_ulimits (a VM without CAP_SYS_RESOURCE cannot raise them)"
  fi
  # 2. Hybrid cgroups (v1 + a v2 tree holding controllers): crun refuses; move those controllers to v1.
  local ctl=/sys/fs/cgroup/unified/cgroup.controllers
  if [[ -f $ctl && -n "$(cat "$ctl")" ]]; then  # (-s is false on cgroupfs files)
    for c in $(cat "$ctl"); do
      mkdir -p "/sys/fs/cgroup/$c" && mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c"
      step "cgroup controller $c moved from the v2 tree to its own v1 hierarchy (crun refuses hybrid mode)"
    done
  fi
}
timed host-fixes host_fixes

# ---------------------------------------------------------------- base image
# Debian bookworm with python3 + pip, standing in for python:3.11.11-slim-bookworm (Docker Hub is unreachable):
# tagged with the exact FROM name, so both Dockerfiles build unchanged with --pull=never.
BASE_TAG=docker.io/library/python:3.11.11-slim-bookworm
base_image() {
  podman image exists "$BASE_TAG" && return 0
  local tar="$CACHE/pybase-bookworm.tar"
  if [[ ! -f $tar ]]; then
    local mirror
    mirror="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    mirror="${mirror:-http://deb.debian.org/debian}"
    step "mmdebstrap bookworm from $mirror"
    mmdebstrap --quiet --variant=minbase --aptopt='APT::Install-Recommends "false"' \
      --include=python3,python3-pip,ca-certificates \
      --customize-hook='ln -sf /usr/bin/python3 "$1/usr/local/bin/python"; ln -sf /usr/bin/python3 "$1/usr/local/bin/python3"; rm -f "$1"/usr/lib/python3.*/EXTERNALLY-MANAGED' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/var/cache/apt/*' \
      bookworm "${tar%.tar}.part.tar" "$mirror"
    mv "${tar%.tar}.part.tar" "$tar"
  fi
  podman import --quiet --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tar" "$BASE_TAG" >/dev/null
}
timed base-image base_image

# ---------------------------------------------------------------- pause image
PAUSE_TAG=localhost/kubellm-pause:3.10-local
pause_image() {
  podman image exists "$PAUSE_TAG" && return 0
  local d; d="$(mktemp -d)"
  cp "$HERE/node/pause/main.go" "$d/main.go"
  (cd "$d" && printf 'module local.invalid/pause\n\ngo 1.22\n' > go.mod &&
    CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS= go build -trimpath -ldflags='-s -w' -o pause . &&
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > Containerfile &&
    podman build --quiet --pull=never -t "$PAUSE_TAG" . >/dev/null)
  rm -rf "$d"
}
timed pause-image pause_image

# ------------------------------------------------------------- disk for images
# containerd keeps an image version's unpacked layers after its tag is dropped (~6 GB per runtime version), so a
# machine that runs this tier after every change fills its disk (a runtime build failed at 20 GB free); a new
# runtime image needs ~6 GB in podman, then ~12 GB in containerd. Below that room, and with no node running, the
# node's image store starts afresh: the images are built and imported again.
MIN_FREE_GB=${KUBELLM_NODE_MIN_FREE_GB:-24}
free_gb=$(df -BG --output=avail "$(dirname "$STATE")" | tail -1 | tr -dc 0-9)
if [[ -d $STATE/containerd ]] && (( free_gb < MIN_FREE_GB )) && ! pgrep -f "containerd --config /run/kubellm-node/" >/dev/null; then
  echo "[node-setup] ${free_gb} GB free (< ${MIN_FREE_GB} GB): emptying the node's image store $STATE/containerd" >&2
  bash "$HERE/node-cleanup.sh" >/dev/null 2>&1 || true   # unmounts what a crashed run left under the state dir
  rm -rf "$STATE/containerd" "$STATE/imported"
fi

# -------------------------------------------------------------- project images
# Tagged by a hash of everything the Dockerfile reads, so an image already imported into the node's containerd
# (a marker in $STATE/imported) is neither rebuilt nor re-imported; the podman copy is removed after import.
context_hash() {  # $1 = Dockerfile
  (cd "$CONTEXT" && { cat "$1" .dockerignore pyproject.toml README.md scripts/install.sh;
    find kubellm requirements -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort | xargs cat; } | sha256sum | cut -c1-12)
}
BUILD_MOUNTS=()
build_mounts() {  # the egress CA (TLS-intercepting proxies) and uv's use of it, for RUN steps only, not baked in
  local ca=/etc/ssl/certs/ca-certificates.crt
  mkdir -p "$CACHE/buildmnt" && printf 'native-tls = true\n' > "$CACHE/buildmnt/uv.toml"
  BUILD_MOUNTS=(-v "$CACHE/buildmnt/uv.toml:/etc/uv/uv.toml:ro")
  [[ -f $ca ]] && BUILD_MOUNTS+=(-v "$ca:$ca:ro")
  # this host's uv cache over the Dockerfiles' cache mount: the wheels `make setup` downloaded (torch, CUDA) are
  # not downloaded again for the runtime image, and the cache outlives podman's storage
  local uvc; uvc="$(python3 -m uv cache dir 2>/dev/null || true)"
  [[ -n $uvc ]] && mkdir -p "$uvc" && BUILD_MOUNTS+=(-v "$uvc:/root/.cache/uv")
  return 0
}
build_mounts
project_image() {  # $1 = operator|runtime
  local name=$1 tag
  tag="localhost/kubellm-$name:$(context_hash "Dockerfile.$name")"
  if [[ -f "$STATE/imported/${tag//[\/:]/_}" ]] || podman image exists "$tag"; then echo "$tag"; return 0; fi
  step "podman build Dockerfile.$name -> $tag"
  (cd "$CONTEXT" && podman build --quiet --pull=never --layers "${BUILD_MOUNTS[@]}" -f "Dockerfile.$name" -t "$tag" . >/dev/null) || return 1
  echo "$tag"
}
# KUBELLM_NODE_OPERATOR_IMAGE / KUBELLM_NODE_RUNTIME_IMAGE: use these (already imported) tags instead of building
# the working tree's (a developer's shortcut while iterating on tests; CI never sets them)
t=$SECONDS; OPERATOR_IMAGE="${KUBELLM_NODE_OPERATOR_IMAGE:-$(project_image operator)}"
echo "[node-setup] operator-image: $((SECONDS - t))s" >&2
t=$SECONDS; RUNTIME_IMAGE="${KUBELLM_NODE_RUNTIME_IMAGE:-$(project_image runtime)}"
echo "[node-setup] runtime-image: $((SECONDS - t))s" >&2

# --------------------------------------------------------- kubelet, kube-proxy, helm
if [[ -n "${KUBELLM_NODE_IMAGES_ONLY:-}" ]]; then
  printf 'PAUSE_IMAGE=%s\nOPERATOR_IMAGE=%s\nRUNTIME_IMAGE=%s\n' "$PAUSE_TAG" "$OPERATOR_IMAGE" "$RUNTIME_IMAGE"
  exit 0
fi
t=$SECONDS; NODE_BINS="$(bash "$HERE/build-node-bins.sh")"; echo "[node-setup] kubelet+kube-proxy: $((SECONDS - t))s" >&2
t=$SECONDS; HELM="$(bash "$HERE/build-node-bins.sh" --helm)"; echo "[node-setup] helm: $((SECONDS - t))s" >&2

step "done"
{
  echo "NODE_BINS=$NODE_BINS"
  echo "HELM=$HELM"
  echo "PAUSE_IMAGE=$PAUSE_TAG"
  echo "OPERATOR_IMAGE=$OPERATOR_IMAGE"
  echo "RUNTIME_IMAGE=$RUNTIME_IMAGE"
  echo "STATE=$STATE"
} | tee "$STATE/node.env"
