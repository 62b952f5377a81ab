#!/usr/bin/env bash
# Provide kube-apiserver, etcd and kubectl for the local control plane.
#
# Prints the folder holding the three binaries on stdout (and nothing else),
# progress on stderr. Order of preference:
#   1. $KUBEBUILDER_ASSETS (envtest convention) when it holds all three;
#   2. a cache folder outside the repo, keyed by the pinned versions;
#   3. a one-time build with Go from the pinned modules into that cache.
# A warm run costs a few stat() calls; a cold build takes minutes on 2 cores.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=hack/k8s-modules.sh
. "$HERE/k8s-modules.sh"   # the staging-module replaces and version stamps hack/node.sh shares

K8S_VERSION="${KUBETRIAGE_K8S_VERSION:-v1.35.8}"
ETCD_VERSION="${KUBETRIAGE_ETCD_VERSION:-v3.6.16}"
CACHE_ROOT="${KUBETRIAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetriage}"
BIN_DIR="$CACHE_ROOT/control-plane/k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}"
BINARIES=(kube-apiserver etcd kubectl)

log() { printf '[control-plane] %s\n' "$*" >&2; }

have_all() {
  local dir="$1" b
  for b in "${BINARIES[@]}"; do [[ -x "$dir/$b" ]] || return 1; done
}

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  if have_all "$KUBEBUILDER_ASSETS"; then
    echo "$KUBEBUILDER_ASSETS"; exit 0
  fi
  log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks one of ${BINARIES[*]}; building instead"
fi

if have_all "$BIN_DIR"; then echo "$BIN_DIR"; exit 0; fi

command -v go >/dev/null || { log "Go is needed to build the control plane (or set KUBEBUILDER_ASSETS)"; exit 1; }

# Serialise concurrent cold builds (two test sessions started at once).
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.control-plane.lock"
flock 9
if have_all "$BIN_DIR"; then echo "$BIN_DIR"; exit 0; fi

WORK="$CACHE_ROOT/build/k8s-${K8S_VERSION}"
ETCD_WORK="$CACHE_ROOT/build/etcd-${ETCD_VERSION}"
STAGE="$BIN_DIR.partial"
rm -rf "$STAGE"; mkdir -p "$WORK" "$ETCD_WORK" "$STAGE"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
start=$(date +%s)

log "cold build: Kubernetes $K8S_VERSION and etcd $ETCD_VERSION into $BIN_DIR (several minutes, once)"
k8s_modules_init "$WORK" "$K8S_VERSION"
cd "$WORK"
log "downloading modules for kube-apiserver and kubectl"
go get "k8s.io/kubernetes@$K8S_VERSION" >&2
go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION" >&2
ldflags="$(k8s_ldflags "$K8S_VERSION")"
log "compiling kube-apiserver and kubectl (the long part)"
go build -trimpath -ldflags "$ldflags" -o "$STAGE/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl >&2
log "kube-apiserver and kubectl built after $(( $(date +%s) - start ))s"

cd "$ETCD_WORK"
[[ -f go.mod ]] || go mod init kubetriage.local/etcd >/dev/null 2>&1
log "downloading and compiling etcd $ETCD_VERSION"
go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
go build -trimpath -ldflags "-s -w" -o "$STAGE/etcd" go.etcd.io/etcd/server/v3 >&2

have_all "$STAGE" || { log "build finished without all of ${BINARIES[*]}"; exit 1; }
rm -rf "$BIN_DIR"; mv "$STAGE" "$BIN_DIR"
log "done in $(( $(date +%s) - start ))s: $("$BIN_DIR/kube-apiserver" --version) / etcd $ETCD_VERSION"
echo "$BIN_DIR"
