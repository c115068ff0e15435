#!/usr/bin/env bash
# Run every check: ruff, mypy, import-linter, then pytest with a throwaway
# PostgreSQL (started here, stopped by its data directory on exit).
# LIFECYCLE_CI=1 turns a missing tier (postgres) into a failure instead of a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

work=$(mktemp -d /tmp/lifecycle-test.XXXXXX)
chmod 755 "$work"
pgdata="$work/pgdata"
cleanup() {
  if [[ -f $pgdata/postmaster.pid ]]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null || true
  fi
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

ruff check .
ruff format --check .
mypy
lint-imports
start_postgres
pytest "$@"
