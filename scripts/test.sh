#!/usr/bin/env bash
# Run every check: ruff, mypy, import-linter, then pytest with a throwaway
# PostgreSQL (stopped by its data directory on exit) and, as root, libvirtd and
# virtlogd for real QEMU (stopped by their pidfiles on exit), plus a second
# libvirt host at qemu+tcp://127.0.0.2/system (scripts/second-host.sh, stopped
# by its pidfiles on exit; LIFECYCLE_HOST2_ADDR picks another 127.x address).
# LIFECYCLE_CI=1 turns a missing tier (postgres, libvirt, qemu) into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
# shellcheck source=scripts/libvirtd.sh
source scripts/libvirtd.sh

work=$(mktemp -d /tmp/lifecycle-test.XXXXXX)
chmod 755 "$work"
pgdata="$work/pgdata"
cleanup() {
  if [[ -f $pgdata/postmaster.pid ]]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null || true
  fi
  stop_libvirt "$work"
  ./scripts/second-host.sh stop "$work/host2" || true
  rm -rf "$work"
}
trap cleanup EXIT

start_postgres() {
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [[ -z $PGBIN || $(id -u) != 0 ]]; then
    echo "test: PostgreSQL binaries or root missing; the postgres tier will skip (fail under LIFECYCLE_CI=1)" >&2
    return 0
  fi
  local port=${LIFECYCLE_PG_PORT:-55432}
  install -d -o postgres -g postgres -m 700 "$pgdata"
  install -d -o postgres -g postgres "$work/pgsock"
  runuser -u postgres -- "$PGBIN/initdb" -D "$pgdata" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$pgdata" -l "$work/pgsock/pg.log" -w \
    -o "-p $port -k $work/pgsock -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null
  psql -q -h 127.0.0.1 -p "$port" -U postgres -c 'create database lifecycle_test' >/dev/null
  export LIFECYCLE_TEST_PG_URL="postgresql+psycopg://postgres@127.0.0.1:$port/lifecycle_test"
  echo "test: throwaway PostgreSQL on port $port"
}

start_libvirt_for_tests() {
  if ! libvirt_usable; then
    echo "test: libvirtd or root missing; the qemu tier will skip (fail under LIFECYCLE_CI=1)" >&2
    return 0
  fi
  start_libvirt "$work"
  if [[ $LIBVIRT_STARTED == 0 ]]; then
    echo "test: the libvirtd restart test needs one started here" >&2
  fi
}

start_second_host() {
  if [[ $(id -u) != 0 ]] || ! command -v libvirtd >/dev/null || ! command -v unshare >/dev/null; then
    echo "test: libvirtd, unshare or root missing; the second-host tests will skip (fail under LIFECYCLE_CI=1)" >&2
    return 0
  fi
  # Also when the machine's own libvirtd was already running: this one is always ours.
  ./scripts/second-host.sh start "$work/host2"
  export LIFECYCLE_TEST_REMOTE_URI="qemu+tcp://${LIFECYCLE_HOST2_ADDR:-127.0.0.2}/system"
  export LIFECYCLE_TEST_REMOTE_INSTANCES=/var/lib/libvirt/lifecycle
  export LIFECYCLE_TEST_REMOTE_PIDFILE="$work/host2/libvirtd.pid"
}

ruff check .
ruff format --check .
mypy
lint-imports
start_postgres
start_libvirt_for_tests
start_second_host
pytest "$@"
