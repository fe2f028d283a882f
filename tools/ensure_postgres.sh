#!/usr/bin/env bash
# Makes sure PostgreSQL server binaries (initdb, pg_ctl) exist for the test suite; installs
# Debian's postgresql package when they do not. The tests start and stop their own server.
set -euo pipefail
for dir in "" /usr/lib/postgresql/*/bin; do
  if [ -z "$dir" ] && command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    exit 0
  fi
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
    exit 0
  fi
done
if [ -n "${MAIA_TEST_PG_URL:-}" ]; then
  exit 0  # an existing server is used instead
fi
echo "PostgreSQL server binaries not found; installing Debian's postgresql package" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends postgresql
# Debian starts a cluster on install; the tests run their own, so stop the packaged one.
$SUDO service postgresql stop >/dev/null 2>&1 || true
