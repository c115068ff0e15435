#!/usr/bin/env bash
# Set up a fresh machine: system packages (when root and missing) and .venv.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the browser the console test drives (Playwright for Python, with Debian's binary).
SYSTEM_PACKAGES=(postgresql qemu-utils qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu
  libvirt-clients libvirt-dev pkg-config gcc chromium)
# npm builds the console page; a node from elsewhere that brings its own npm is fine.
command -v npm >/dev/null || SYSTEM_PACKAGES+=(nodejs npm)

missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing system packages (${missing[*]}); the tiers that need them will skip" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [[ ! -f $stamp ]]; then
  # libvirt-python has no wheel: it builds against libvirt-dev. Without it, install
  # the rest and let the libvirt and qemu tiers skip (CI makes them fail instead).
  if ! .venv/bin/pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[postgres,libvirt,dev]'; then
    echo "bootstrap: libvirt-python did not build; installing without it" >&2
    .venv/bin/pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[postgres,dev]'
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# The console page and noVNC that `lifecycle console-proxy` serves (console/dist).
if command -v npm >/dev/null; then
  ./scripts/console-assets.sh
else
  echo "bootstrap: npm missing; the console page is not built (the browser console test will skip)" >&2
fi
