#!/usr/bin/env bash
# node-cleanup.sh — undo what a real node (tests/support/real_node.py) leaves on the host, idempotent; safe when
# nothing runs. Processes: only those started with our private paths (containerd's socket under
# /run/kubellm-node, the kubelet/kube-proxy binaries from our cache). Then containers and sandboxes, mounts,
# network namespaces, the CNI bridge and its iptables rules, kubelet/kube-proxy chains, `kubepods` cgroups.
#   --all   also the images in the node's containerd, the state dir, the podman images and build cache, and
#           the host fixes of node-setup.sh (containers.conf line, the hugetlb v1 mount): `make demo-clean`.
set -uo pipefail
RUN=/run/kubellm-node
STATE="${KUBELLM_NODE_STATE:-/var/lib/kubellm-node}"
BRIDGE=kcni0
[[ $(id -u) == 0 ]] || { echo "node-cleanup: needs root" >&2; exit 1; }

# processes (ours only: matched by their private paths, stopped by pid)
for pat in "kubelet --config=$RUN/" "kube-proxy --kubeconfig=" "containerd --config $RUN/containerd.toml"; do
  for pid in $(pgrep -f -- "$pat" || true); do
    case "$(readlink -f /proc/$pid/exe 2>/dev/null)" in
      */k8s-test-bins/node-*/kubelet|*/k8s-test-bins/node-*/kube-proxy|/usr/bin/containerd) kill -TERM "$pid" ;;
    esac
  done
done
sleep 1
# containers and sandboxes left running (shim processes survive containerd)
for pid in $(pgrep -f "containerd-shim-runc-v2 -namespace k8s.io -address $RUN/containerd.sock" || true); do
  pkill -KILL -P "$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null
done
# mounts under our state and run dirs (deepest first), and CNI network namespaces
grep -E " ($STATE|$RUN)/" /proc/mounts | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
for ns in /run/netns/cni-*; do [[ -e $ns ]] && { umount "$ns" 2>/dev/null; rm -f "$ns"; }; done
# network: the bridge (its veths go with their namespaces), CNI's NAT chains for our subnet, kube chains
ip link del "$BRIDGE" 2>/dev/null
foreign=$(pgrep -x kubelet; pgrep -x kube-proxy) || true   # (ours were stopped above)
for t in iptables ip6tables; do
  command -v "$t" >/dev/null || continue
  # CNI's per-container NAT chains of our network only (podman's CNI networks use the same naming)
  $t -t nat -S POSTROUTING 2>/dev/null | grep -F 'kubellm-pods' | grep -E -- '-j CNI-[0-9a-f]+' |
    while read -r rule; do
      eval "$t -t nat ${rule/#-A/-D}" 2>/dev/null
      chain=$(grep -oE 'CNI-[0-9a-f]+' <<<"$rule" | tail -1)
      $t -t nat -F "$chain" 2>/dev/null; $t -t nat -X "$chain" 2>/dev/null
    done
  [[ -n $foreign ]] && continue   # another kubelet/kube-proxy owns KUBE-* chains here: leave them
  for table in filter nat mangle; do
    # jumps into KUBE-* chains from the built-in chains, then the chains themselves
    $t -t "$table" -S 2>/dev/null | grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*-j KUBE-' |
      sed 's/^-A/-D/' | while read -r rule; do eval "$t -t $table $rule" 2>/dev/null; done
    chains=$($t -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/{print $2}')
    for c in $chains; do $t -t "$table" -F "$c" 2>/dev/null; done
    for c in $chains; do $t -t "$table" -X "$c" 2>/dev/null; done
  done
done
command -v conntrack >/dev/null && conntrack -D -s 10.244.0.0/24 >/dev/null 2>&1
rm -rf /var/lib/cni/networks/kubellm-pods "$RUN/cni-ipam"
# cgroups the kubelet made (children first)
for h in /sys/fs/cgroup/*/; do
  [[ -d "$h/kubepods" ]] && find "$h/kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null
done
rm -rf "$RUN"/containerd-state "$STATE/kubelet" "$STATE/pod-logs"

if [[ "${1:-}" == --all ]]; then
  rm -rf "$STATE" "$RUN"
  podman rmi -af >/dev/null 2>&1; podman system prune -af >/dev/null 2>&1
  if [[ -f /etc/containers/containers.conf ]]; then
    sed -i '/^default_ulimits = \["nofile=20000:20000", "nproc=32768:32768"\]$/d' /etc/containers/containers.conf
    grep -qv '^\[containers\]$' /etc/containers/containers.conf || rm -f /etc/containers/containers.conf
  fi
  mountpoint -q /sys/fs/cgroup/hugetlb && umount /sys/fs/cgroup/hugetlb && rmdir /sys/fs/cgroup/hugetlb 2>/dev/null
  echo "node-cleanup: host restored (Debian packages and ~/.cache binaries kept; apt-get remove / rm -rf to drop)" >&2
fi
exit 0
