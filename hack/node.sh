#!/usr/bin/env bash
# Provide what a real single-node cluster needs on top of the control plane
# (hack/control-plane.sh): the node binaries and the Debian packages.
#
#   hack/node.sh             print the folder holding kubelet, kube-controller-manager,
#                            kube-scheduler, kube-proxy and coredns (built once, cached)
#   hack/node.sh packages    install the Debian packages (containerd, runc, CNI plugins,
#                            iptables, buildah, debootstrap); as root, with apt-get
#   hack/node.sh check       exit 0 when the packages are present (no output)
#
# Progress goes to stderr; stdout carries only the answer. The binaries are
# built from the same pinned modules as the control plane (hack/k8s-modules.sh)
# into a cache keyed by version, under a lock, so concurrent sessions build once.
# A warm run costs a few stat() calls; a cold build takes ~3 min on 2 cores when
# the control plane's Go build cache is warm (~8 min when it is not), plus ~3 min
# for CoreDNS.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=hack/k8s-modules.sh
. "$HERE/k8s-modules.sh"

K8S_VERSION="${KUBETRIAGE_K8S_VERSION:-v1.35.8}"
COREDNS_VERSION="${KUBETRIAGE_COREDNS_VERSION:-v1.15.0}"
CACHE_ROOT="${KUBETRIAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetriage}"
BIN_DIR="$CACHE_ROOT/node/k8s-${K8S_VERSION}-coredns-${COREDNS_VERSION}"
BINARIES=(kubelet kube-controller-manager kube-scheduler kube-proxy coredns)
# command -> Debian package. bookworm: containerd 1.6.20, runc 1.1.5, CNI plugins
# 1.1.1 in /usr/lib/cni, iptables 1.8.9 (nf_tables), buildah 1.28.2.
declare -A PACKAGES=(
  [containerd]=containerd [ctr]=containerd [runc]=runc
  [/usr/lib/cni/bridge]=containernetworking-plugins [iptables]=iptables [conntrack]=conntrack
  [buildah]=buildah [debootstrap]=debootstrap [gcc]=gcc [/usr/include/stdio.h]=libc6-dev
  # nft: the teardown removes the (empty) nf_tables tables iptables-nft created, when there were none before
  [nft]=nftables
)

log() { printf '[node] %s\n' "$*" >&2; }

missing_packages() {
  local c
  for c in "${!PACKAGES[@]}"; do
    if [[ "$c" == /* ]]; then [[ -e "$c" ]] || echo "${PACKAGES[$c]}"
    else command -v "$c" >/dev/null 2>&1 || [[ -x "/usr/sbin/$c" ]] || echo "${PACKAGES[$c]}"; fi
  done | sort -u
}

case "${1:-bins}" in
  check)
    [[ -z "$(missing_packages)" ]]; exit ;;
  packages)
    mapfile -t missing < <(missing_packages)
    [[ ${#missing[@]} -eq 0 ]] && { log "Debian packages present"; exit 0; }
    if [[ $(id -u) -ne 0 ]]; then log "missing Debian packages: ${missing[*]} (run as root, or apt-get install them)"; exit 1; fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian's containerd package would start a system containerd; the node runs its own.
    (service containerd stop >/dev/null 2>&1 || true)
    exit 0 ;;
  bins) ;;
  *) echo "usage: $0 [bins|packages|check]" >&2; exit 2 ;;
esac

have_all() { local b; for b in "${BINARIES[@]}"; do [[ -x "$BIN_DIR/$b" ]] || return 1; done; }
if have_all; then echo "$BIN_DIR"; exit 0; fi
command -v go >/dev/null || { log "Go is needed to build the node binaries"; exit 1; }

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.node.lock"
flock 9
if have_all; then echo "$BIN_DIR"; exit 0; fi

WORK="$CACHE_ROOT/build/node-k8s-${K8S_VERSION}"
DNS_WORK="$CACHE_ROOT/build/coredns-${COREDNS_VERSION}"
STAGE="$BIN_DIR.partial"
mkdir -p "$WORK" "$DNS_WORK" "$STAGE"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
start=$(date +%s)
log "cold build: kubelet, kube-controller-manager, kube-scheduler, kube-proxy $K8S_VERSION and CoreDNS $COREDNS_VERSION into $BIN_DIR (minutes, once)"

# The control plane's module (same replaces, its go.sum already verified) saves
# the resolution step; without it (KUBEBUILDER_ASSETS users) resolve here.
cp_work="$CACHE_ROOT/build/k8s-${K8S_VERSION}"
if [[ ! -f "$WORK/go.mod" && -f "$cp_work/go.mod" ]]; then
  cp "$cp_work/go.mod" "$cp_work/go.sum" "$WORK/"
  (cd "$WORK" && go mod edit -module kubetriage.local/node)
fi
k8s_modules_init "$WORK" "$K8S_VERSION"
cd "$WORK"
cmds=(kubelet kube-controller-manager kube-scheduler kube-proxy)
missing_k8s=()
for b in "${cmds[@]}"; do [[ -x "$STAGE/$b" ]] || missing_k8s+=("$b"); done
if [[ ${#missing_k8s[@]} -gt 0 ]]; then
  log "downloading modules for ${missing_k8s[*]}"
  go get "k8s.io/kubernetes@$K8S_VERSION" >&2
  go get -tool $(printf "k8s.io/kubernetes/cmd/%s@$K8S_VERSION " "${missing_k8s[@]}") >&2
  log "compiling ${missing_k8s[*]} (the long part)"
  nice -n 10 go build -trimpath -ldflags "$(k8s_ldflags "$K8S_VERSION")" -o "$STAGE/" \
    $(printf "k8s.io/kubernetes/cmd/%s " "${missing_k8s[@]}") >&2
  log "Kubernetes node binaries built after $(( $(date +%s) - start ))s"
fi

if [[ ! -x "$STAGE/coredns" ]]; then
  cd "$DNS_WORK"
  [[ -f go.mod ]] || go mod init kubetriage.local/coredns >/dev/null 2>&1
  log "downloading and compiling CoreDNS $COREDNS_VERSION"
  go get -tool "github.com/coredns/coredns@$COREDNS_VERSION" >&2
  nice -n 10 go build -trimpath -ldflags "-s -w" -o "$STAGE/coredns" github.com/coredns/coredns >&2
fi

have_all_stage() { local b; for b in "${BINARIES[@]}"; do [[ -x "$STAGE/$b" ]] || return 1; done; }
have_all_stage || { log "build finished without all of ${BINARIES[*]}"; exit 1; }
rm -rf "$BIN_DIR"; mv "$STAGE" "$BIN_DIR"
log "done in $(( $(date +%s) - start ))s: $("$BIN_DIR/kubelet" --version)"
echo "$BIN_DIR"
