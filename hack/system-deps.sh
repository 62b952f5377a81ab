#!/usr/bin/env bash
# Install the Debian packages the tests and demo run for real (Redis, PostgreSQL, ...).
# As root: apt-get installs what is missing. Otherwise: one line per missing package.
#   hack/system-deps.sh           everything `make test` uses
#   hack/system-deps.sh demo      only what `make demo` uses (Redis; the demo's database is SQLite)
set -euo pipefail
declare -A need=(
  [redis-server]=redis-server
  [initdb]=postgresql
  [openssl]=openssl
  [flock]=util-linux
  [prometheus-alertmanager]=prometheus-alertmanager
  [prometheus]=prometheus
  [promtool]=prometheus
)
if [[ "${1:-}" == "demo" ]]; then
  need=([redis-server]=redis-server [openssl]=openssl [flock]=util-linux)
fi
missing=()
for bin in "${!need[@]}"; do
  if ! command -v "$bin" >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/"$bin" >/dev/null 2>&1; then
    missing+=("${need[$bin]}")
  fi
done
[[ ${#missing[@]} -eq 0 ]] && { echo "[deps] system packages present"; exit 0; }
if [[ $(id -u) -ne 0 ]]; then
  for p in $(printf "%s\n" "${missing[@]}" | sort -u); do echo "[deps] missing Debian package '$p': run 'sudo apt-get install $p'"; done
  exit 1
fi
echo "[deps] installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $(printf "%s\n" "${missing[@]}" | sort -u) >/dev/null
# Debian starts the packaged services; the tests run their own on free ports.
for svc in redis-server postgresql prometheus prometheus-alertmanager; do
  (service "$svc" stop >/dev/null 2>&1 || true)
done
echo "[deps] installed ${missing[*]}"
