# Sourced by scripts/test.sh and scripts/demo.sh: start the machine's libvirtd
# and virtlogd for real QEMU, by pidfile, when none answers.
#
#   start_libvirt WORK   sets LIBVIRT_STARTED=1 and LIFECYCLE_LIBVIRTD_PIDFILE when it started them
#   stop_libvirt WORK    stops what start_libvirt started (by the pidfiles in WORK)
#   libvirt_usable       whether this machine can run libvirtd here (root, libvirtd installed)

libvirt_usable() {
  [[ $(id -u) == 0 ]] && command -v libvirtd >/dev/null
}

start_libvirt() {
  local work=$1
  LIBVIRT_STARTED=0
  if virsh -q -c qemu:///system version >/dev/null 2>&1; then
    echo "libvirtd: using the one already running" >&2
    return 0
  fi
  # The start sequence of platform-notes.md: each step prevents a known failure.
  getent group kvm >/dev/null || addgroup --quiet --system kvm
  getent group libvirt-qemu >/dev/null || addgroup --quiet --system libvirt-qemu
  getent passwd libvirt-qemu >/dev/null || adduser --quiet --system --ingroup kvm \
    --disabled-login --disabled-password --home /var/lib/libvirt --no-create-home libvirt-qemu
  mkdir -p /var/log/libvirt
  grep -q '^user = "root"' /etc/libvirt/qemu.conf 2>/dev/null || printf 'user = "root"\ngroup = "root"\n' >> /etc/libvirt/qemu.conf
  virtlogd -d -p "$work/virtlogd.pid"
  libvirtd -d -p "$work/libvirtd.pid"
  # libvirtd -d returns 0 even when the daemon dies at start: poll until it answers.
  for _ in $(seq 100); do virsh -q -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
  virsh -q -c qemu:///system version >/dev/null
  LIBVIRT_STARTED=1
  export LIFECYCLE_LIBVIRTD_PIDFILE="$work/libvirtd.pid"
  echo "libvirtd: started, pid $(cat "$work/libvirtd.pid")" >&2
}

stop_libvirt() {
  local work=$1 pidfile
  for pidfile in "$work/libvirtd.pid" "$work/virtlogd.pid"; do
    if [[ -s $pidfile ]]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
  done
}
