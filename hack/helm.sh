#!/usr/bin/env bash
# Provide the `helm` binary for the chart tests and `make kind-up`.
#
# Prints the path of the helm binary on stdout (and nothing else), progress on
# stderr. Order of preference:
#   1. $HELM when it names an executable (a helm you already trust);
#   2. a cache folder outside the repo, keyed by the pinned version;
#   3. a one-time build with Go from the pinned module into that cache.
# We build instead of downloading a release tarball so that the only sources
# are the Go module proxy and checksum database, the same as the control plane
# (hack/control-plane.sh). A warm run costs a stat(); a cold build takes a few
# minutes on 2 cores.
set -euo pipefail

HELM_VERSION="${KUBETRIAGE_HELM_VERSION:-v3.22.0}"
CACHE_ROOT="${KUBETRIAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetriage}"
BIN_DIR="$CACHE_ROOT/helm/${HELM_VERSION}"

log() { printf '[helm] %s\n' "$*" >&2; }

if [[ -n "${HELM:-}" ]]; then
  if [[ -x "$HELM" ]] || command -v "$HELM" >/dev/null 2>&1; then
    command -v "$HELM"; exit 0
  fi
  log "HELM=$HELM is not an executable; building $HELM_VERSION instead"
fi

if [[ -x "$BIN_DIR/helm" ]]; then echo "$BIN_DIR/helm"; exit 0; fi

command -v go >/dev/null || { log "Go is needed to build helm (or set HELM to a helm binary)"; exit 1; }

# Serialise concurrent cold builds (two test sessions started at once).
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.helm.lock"
flock 9
if [[ -x "$BIN_DIR/helm" ]]; then echo "$BIN_DIR/helm"; exit 0; fi

WORK="$CACHE_ROOT/build/helm-${HELM_VERSION}"
STAGE="$BIN_DIR.partial"
rm -rf "$STAGE"; mkdir -p "$WORK" "$STAGE"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
start=$(date +%s)

log "cold build: helm $HELM_VERSION into $BIN_DIR (a few minutes, once)"
cd "$WORK"
[[ -f go.mod ]] || go mod init kubetriage.local/helm >/dev/null 2>&1
log "downloading helm.sh/helm/v3@$HELM_VERSION and its dependencies"
go get -tool "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2

# Stamp the version and the Kubernetes version helm assumes without a cluster
# (`helm template`'s .Capabilities.KubeVersion, lint's deprecation checks), as
# helm's own Makefile does; an unstamped build reports v3.x and Kubernetes 1.20.
clientgo=$(go list -f '{{.Version}}' -m k8s.io/client-go)   # v0.MINOR.PATCH
kminor="${clientgo#v0.}"; kminor="${kminor%%.*}"
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$kminor"
done
log "compiling helm (client-go $clientgo)"
go build -trimpath -ldflags "$ldflags" -o "$STAGE/helm" helm.sh/helm/v3/cmd/helm >&2

[[ -x "$STAGE/helm" ]] || { log "build finished without a helm binary"; exit 1; }
rm -rf "$BIN_DIR"; mv "$STAGE" "$BIN_DIR"
log "done in $(( $(date +%s) - start ))s: $("$BIN_DIR/helm" version --short)"
echo "$BIN_DIR/helm"
