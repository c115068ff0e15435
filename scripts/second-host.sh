#!/usr/bin/env bash
# A second libvirt host on this machine, for tests: its own libvirtd and
# virtlogd in a private mount namespace, reachable only over TCP at
# qemu+tcp://127.0.0.2/system (as a hypervisor on another machine would be).
#
#   scripts/second-host.sh start DIR   (root) prepare DIR, start the daemons, wait until they answer
#   scripts/second-host.sh stop DIR    stop them and the QEMU processes they started
#
# LIFECYCLE_HOST2_ADDR picks another address of 127.0.0.0/8 (on lo), for a
# second run beside the first: qemu+tcp://ADDR/system.
#
# Inside the namespace DIR/run, DIR/lib, DIR/etc and DIR/log are bind-mounted on
# /run/libvirt, /var/lib/libvirt, /etc/libvirt and /var/log/libvirt. Its
# instances path /var/lib/libvirt/lifecycle (DIR/lib/lifecycle) therefore exists
# only inside the namespace: the engine reaches it through libvirt alone.
# The daemons are stopped by their pidfiles DIR/virtlogd.pid and DIR/libvirtd.pid,
# and QEMU by the pidfiles under DIR/run/qemu; each pid is first checked to be a
# process of this host (its /var/lib/libvirt is DIR/lib), none is found by name.
# Starting again in a stopped DIR keeps the host's definitions (a reboot).
set -euo pipefail

ADDR=${LIFECYCLE_HOST2_ADDR:-127.0.0.2}
PORT=16509
URI="qemu+tcp://$ADDR/system"
INSTANCES=/var/lib/libvirt/lifecycle
START_SECONDS=30

die() {
  echo "second-host: $*" >&2
  exit 1
}

[[ $# == 2 && ($1 == start || $1 == stop) ]] || die "usage: $0 start|stop DIR"
action=$1
dir=$(realpath -m -- "$2")

# ours PID: PID is alive (not a zombie) and its /var/lib/libvirt is DIR/lib: a process of this
# host's namespace (libvirtd, virtlogd) or of one made from it (libvirt gives QEMU its own /dev).
ours() {
  local state
  [[ $1 =~ ^[0-9]+$ && -d $dir/lib ]] || return 1
  state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]] || return 1
  [[ $(stat -L -c %d:%i "/proc/$1/root/var/lib/libvirt" 2>/dev/null) == "$(stat -c %d:%i "$dir/lib")" ]]
}

# any_ours PID...: whether one of them is still a process of ours.
any_ours() {
  local pid
  for pid in "$@"; do ours "$pid" && return 0; done
  return 1
}

# stop_pids SECONDS PID...: SIGTERM those of ours, wait up to SECONDS, then SIGKILL and wait again.
stop_pids() {
  local seconds=$1 pid signal
  shift
  for signal in TERM KILL; do
    any_ours "$@" || return 0
    [[ $signal == KILL ]] && echo "second-host: $* still running ${seconds} s after SIGTERM; SIGKILL" >&2
    for pid in "$@"; do
      if ours "$pid"; then kill "-$signal" "$pid" 2>/dev/null || true; fi
    done
    for _ in $(seq $((seconds * 10))); do
      any_ours "$@" || return 0
      sleep 0.1
    done
  done
  echo "second-host: $* survived SIGKILL" >&2
  return 1
}

pidfile_pid() {
  [[ -s $1 ]] && tr -dc 0-9 <"$1" || true
}

# qemu_cgroups PID...: the cgroups libvirt made for those QEMU processes (/machine/qemu-ID-NAME.libvirt-qemu).
qemu_cgroups() {
  local pid line
  for pid in "$@"; do
    if ! ours "$pid"; then continue; fi
    while IFS= read -r line; do
      if [[ $line =~ ^[0-9]+:[^:]*:(/.*\.libvirt-qemu)(/.*)?$ ]]; then echo "${BASH_REMATCH[1]}"; fi
    done <"/proc/$pid/cgroup" || true
  done | sort -u
}

# remove_cgroups CGROUP...: remove them, once empty, from every cgroup hierarchy (libvirt does when
# it stops a domain itself; a QEMU killed here would leave them behind).
remove_cgroups() {
  local cgroup base
  for cgroup in "$@"; do
    for base in /sys/fs/cgroup /sys/fs/cgroup/*; do
      if [[ -d $base$cgroup ]]; then find "$base$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
    done
  done
}

stop() {
  [[ -d $dir/lib ]] || return 0 # never prepared
  local libvirtd virtlogd qemu=() cgroups=() f
  libvirtd=$(pidfile_pid "$dir/libvirtd.pid")
  virtlogd=$(pidfile_pid "$dir/virtlogd.pid")
  # libvirtd first, so that it starts nothing more; QEMU outlives it (as on a real host), so
  # read the QEMU pidfiles after it is gone; virtlogd last, it holds QEMU's output.
  stop_pids 10 "$libvirtd"
  for f in "$dir"/run/qemu/*.pid; do
    if [[ -e $f ]]; then qemu+=("$(pidfile_pid "$f")"); fi
  done
  if ((${#qemu[@]})); then
    mapfile -t cgroups < <(qemu_cgroups "${qemu[@]}")
    stop_pids 5 "${qemu[@]}"
    remove_cgroups "${cgroups[@]}"
  fi
  stop_pids 5 "$virtlogd"
}

# elapsed SINCE: seconds, to a tenth, since $EPOCHREALTIME was SINCE.
elapsed() {
  awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}

show_logs() {
  local f
  for f in "$dir"/log/*.log; do
    [[ -e $f ]] || continue
    echo "---- $f (last 100 lines)" >&2
    tail -n 100 "$f" >&2
  done
}

start() {
  [[ $(id -u) == 0 ]] || die "start needs root"
  local cmd
  for cmd in libvirtd virtlogd virsh unshare mount; do
    command -v "$cmd" >/dev/null || die "$cmd not found (apt-get install libvirt-daemon-driver-qemu libvirt-clients)"
  done
  # The instances path must exist only inside the namespace, or the engine could reach it
  # through its own filesystem and a test would pass for the wrong reason.
  [[ ! -e $INSTANCES ]] || die "$INSTANCES exists on this machine's own filesystem; remove it: it must exist only inside the second host"
  case $dir/ in
  /run/libvirt/* | /var/lib/libvirt/* | /etc/libvirt/* | /var/log/libvirt/* | //)
    die "DIR ($dir) must be outside the folders it is mounted on" ;;
  esac
  if [[ -d $dir && -n $(ls -A "$dir") && ! -f $dir/etc/libvirtd.conf ]]; then
    die "$dir is neither empty nor a folder this script prepared"
  fi
  local pid
  for pid in "$(pidfile_pid "$dir/libvirtd.pid")" "$(pidfile_pid "$dir/virtlogd.pid")"; do
    if ours "$pid"; then die "already running in $dir (pid $pid); stop it first"; fi
  done
  # 127.0.0.0/8 is on lo: 127.0.0.2 is this machine without any set-up. Check, and that the port is free.
  if command -v ip >/dev/null && ! ip -o route get "$ADDR" | grep -q '^local '; then
    die "$ADDR is not a local address here: $(ip -o route get "$ADDR")"
  fi
  if (exec 3<>"/dev/tcp/$ADDR/$PORT") 2>/dev/null; then
    die "something already listens on $ADDR:$PORT (another second host?)"
  fi

  # As for the machine's own libvirtd (scripts/test.sh): the Debian build of libvirtd
  # dies without the libvirt-qemu user; QEMU runs as root (/dev/kvm may be 0600).
  getent group kvm >/dev/null || addgroup --quiet --system kvm
  getent group libvirt-qemu >/dev/null || addgroup --quiet --system libvirt-qemu
  getent passwd libvirt-qemu >/dev/null || adduser --quiet --system --ingroup kvm \
    --disabled-login --disabled-password --home /var/lib/libvirt --no-create-home libvirt-qemu
  # The mount points (not /var/lib/libvirt/lifecycle: that one lives in DIR/lib).
  mkdir -p /run/libvirt /var/lib/libvirt /etc/libvirt /var/log/libvirt

  if [[ ! -f $dir/etc/libvirtd.conf ]]; then
    install -d -m 755 "$dir" "$dir/etc"
    cp -a /etc/libvirt/. "$dir/etc/"
    # Configuration only: the machine's own domains, pools, networks and secrets stay its own.
    rm -rf "$dir/etc/qemu" "$dir/etc/storage" "$dir/etc/secrets" "$dir/etc/libvirtd.conf"
    install -d -m 755 "$dir/etc/qemu" "$dir/etc/storage"
    install -d -m 700 "$dir/etc/secrets"
    [[ -f $dir/etc/qemu.conf ]] || touch "$dir/etc/qemu.conf"
    sed -i -E '/^[[:space:]]*(user|group)[[:space:]]*=/d' "$dir/etc/qemu.conf"
    printf 'user = "root"\ngroup = "root"\n' >>"$dir/etc/qemu.conf"
    cat >"$dir/etc/libvirtd.conf" <<EOF
# Written by scripts/second-host.sh: the second host of the tests.
listen_tls = 0
listen_tcp = 1
listen_addr = "$ADDR"
tcp_port = "$PORT"
auth_tcp = "none"
host_uuid = "$(cat /proc/sys/kernel/random/uuid)"
unix_sock_dir = "$dir/run"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  fi
  # Runtime state does not survive a reboot; nor do pidfiles of daemons killed by SIGKILL.
  rm -rf "$dir/run" "$dir/libvirtd.pid" "$dir/virtlogd.pid"
  install -d -m 755 "$dir/run" "$dir/lib" "$dir/lib/lifecycle" "$dir/log"

  local began=$EPOCHREALTIME deadline=$((SECONDS + START_SECONDS))
  # The namespace lives as long as a process in it: the daemons, once unshare returns.
  # shellcheck disable=SC2016 # expanded by the inner bash, DIR passed as $1
  unshare -m --propagation private bash -euo pipefail -c '
    dir=$1
    mount --bind "$dir/run" /run/libvirt
    mount --bind "$dir/lib" /var/lib/libvirt
    mount --bind "$dir/etc" /etc/libvirt
    mount --bind "$dir/log" /var/log/libvirt
    virtlogd -d -p "$dir/virtlogd.pid"
    libvirtd -d --listen -p "$dir/libvirtd.pid" -f /etc/libvirt/libvirtd.conf
  ' second-host "$dir" || {
    show_logs
    stop
    die "the daemons did not start"
  }

  # libvirtd -d returns 0 even when the daemon dies at start: poll until it answers.
  until virsh -q -c "$URI" version >/dev/null 2>&1; do
    pid=$(pidfile_pid "$dir/libvirtd.pid")
    if ((SECONDS >= deadline)) || { [[ -n $pid ]] && ! ours "$pid"; }; then
      show_logs
      stop
      die "libvirtd did not answer on $URI (pid ${pid:-none}, after $(elapsed "$began") s)"
    fi
    sleep 0.2
  done
  # The one answering must be ours, not a stray daemon on the same address.
  local want caps got=""
  want=$(sed -n 's/^host_uuid = "\(.*\)"$/\1/p' "$dir/etc/libvirtd.conf")
  caps=$(virsh -q -c "$URI" capabilities) || caps=""
  if [[ $caps =~ \<uuid\>([^<]*)\</uuid\> ]]; then got=${BASH_REMATCH[1]}; fi # the first: the host's
  if [[ $got != "$want" ]]; then
    stop
    die "$URI answers with host uuid $got, not this host's $want"
  fi
  echo "second-host: libvirtd pid $(cat "$dir/libvirtd.pid") answers on $URI after $(elapsed "$began") s; instances path $INSTANCES"
}

"$action"
