# Sourced by hack/control-plane.sh and hack/node.sh: the Go module setup both
# Kubernetes builds need. k8s.io/kubernetes requires its staging modules at
# v0.0.0 (they only resolve inside its own repository), so a tool module must
# replace each with the published v0.<minor>.<patch> first.
#
#   k8s_modules_init DIR VERSION   # creates DIR/go.mod (once) with the replaces
k8s_modules_init() {
  local dir="$1" version="$2" staging modfile m
  staging="v0.${version#v1.}"
  mkdir -p "$dir"
  (
    cd "$dir"
    [[ -f go.mod ]] || go mod init "kubetriage.local/$(basename "$dir" | tr -c 'a-zA-Z0-9.\n' -)" >/dev/null 2>&1
    grep -q '^replace k8s.io/api ' go.mod && exit 0
    printf '[k8s-modules] resolving k8s.io/kubernetes@%s staging modules\n' "$version" >&2
    modfile=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    mapfile -t staged < <(grep -E '^\s+k8s\.io/\S+ v0\.0\.0$' "$modfile" | awk '{print $1}')
    printf '[k8s-modules] replacing %s staging modules with %s\n' "${#staged[@]}" "$staging" >&2
    for m in "${staged[@]}"; do go mod edit -replace "$m=$m@$staging"; done
  )
}

# The -ldflags that stamp the version (/version, kubectl's skew check, the
# kubelet's reported version are wrong without them).
k8s_ldflags() {
  local version="$1" minor
  minor="${version#v1.}"; minor="${minor%%.*}"
  printf -- '-s -w'
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- ' -X %s.gitVersion=%s -X %s.gitMajor=1 -X %s.gitMinor=%s' "$pkg" "$version" "$pkg" "$pkg" "$minor"
  done
}
