#!/bin/sh
# The host lock of a planning run: shared, and it writes nothing (on a host never converged
# there is no lock file, and nothing to race with). Answers as lock-exclusive.sh does.
if [ -e /var/lib/provision/lock ]; then
  exec 9</var/lib/provision/lock
  flock -s -n 9 || { echo "busy $(cat /var/lib/provision/lock.owner 2>/dev/null)"; exit 0; }
fi
echo locked
cat >/dev/null
