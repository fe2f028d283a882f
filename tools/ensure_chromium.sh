#!/usr/bin/env bash
# Makes sure a headless-capable Chromium exists for the console's browser tests; installs
# Debian's chromium package when it does not (never a browser download of playwright's own).
set -euo pipefail
if [ -x /usr/lib/chromium/chromium ] || [ -x /usr/bin/chromium ]; then
  exit 0
fi
echo "Chromium not found; installing Debian's chromium package" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
