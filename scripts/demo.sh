#!/usr/bin/env bash
# Run `lifecycle demo` on the embedded default (SQLite). As root with libvirt
# installed, compute-1 is real QEMU under the machine's libvirtd (started here
# by pidfile when none answers) and compute-3 a second libvirtd in its own
# mount namespace at qemu+tcp://127.0.0.2/system (scripts/second-host.sh);
# both are stopped by their pidfiles when the demo ends, however it ends.
# Otherwise the demo runs on fake hosts. Extra arguments go to `lifecycle demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
# shellcheck source=scripts/libvirtd.sh
source scripts/libvirtd.sh

if ! libvirt_usable || ! command -v unshare >/dev/null || ! .venv/bin/python -c 'import libvirt' 2>/dev/null; then
  echo "demo: root, libvirtd or libvirt-python missing; the demo runs on fake hosts" >&2
  exec lifecycle demo "$@"
fi
work=$(mktemp -d /tmp/lifecycle-demo-hosts.XXXXXX)
chmod 755 "$work"
cleanup() {
  ./scripts/second-host.sh stop "$work/host2" >/dev/null 2>&1 || true
  stop_libvirt "$work"
  rm -rf "$work"
}
trap cleanup EXIT
start_libvirt "$work"
remote=()
if ./scripts/second-host.sh start "$work/host2" >&2; then
  remote=(--remote-uri "qemu+tcp://${LIFECYCLE_HOST2_ADDR:-127.0.0.2}/system"
    --remote-instances /var/lib/libvirt/lifecycle/demo)
else
  echo "demo: the second libvirtd did not start; the demo skips the resize onto it" >&2
fi
lifecycle demo --uri qemu:///system "${remote[@]}" "$@"
