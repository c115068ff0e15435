#!/usr/bin/env bash
# Build console/dist: the console page and noVNC (@novnc/novnc, the version pinned in
# console/package-lock.json), which `lifecycle console-proxy` serves. Needs node and npm.
# Safe to run again: it reinstalls only when the lockfile changed.
set -euo pipefail
cd "$(dirname "$0")/../console"

if ! command -v npm >/dev/null; then
  echo "console-assets: npm not found (apt-get install nodejs npm); the console page is not built" >&2
  exit 1
fi
stamp=node_modules/.installed-$(sha1sum package-lock.json | cut -c1-12)
if [[ ! -f $stamp ]]; then
  npm ci --no-audit --no-fund --loglevel=error
  touch "$stamp"
fi
npm run --silent build
