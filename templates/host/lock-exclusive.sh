#!/bin/sh
# The host lock of an applying run (provision/engine.py holds it while the run lasts): its first
# line says "locked", or "busy OWNER" when another run has it; then it waits on its stdin, which
# the engine closes to release it.
# shellcheck disable=SC2174 # /var/lib exists: -m is meant for provision's own directory
mkdir -p -m 0700 /var/lib/provision
exec 9>/var/lib/provision/lock
if ! flock -n 9; then echo "busy $(cat /var/lib/provision/lock.owner 2>/dev/null)"; exit 0; fi
echo "${SUDO_USER:-$(id -un)} since $(date -u +%H:%M:%SZ)" > /var/lib/provision/lock.owner
# A run whose client died may have left an apply script finishing: let it end first.
exec 8>/var/lib/provision/apply.lock
flock -w 600 8 && flock -u 8
echo locked
cat >/dev/null
