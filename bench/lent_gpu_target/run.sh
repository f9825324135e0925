#!/bin/sh
# One call on the lent GPU machine: provision as a real Ubuntu 24.04 target (no sshd, sudo,
# systemd or network there), every transcript under $OUT. As run on 2026-11-22: this folder
# copied to .gpu13/ of the checkout the device tool sends, with src/ (provision/, templates/),
# whl/ (wheels of fabric, paramiko, invoke, tomlkit, cryptography, bcrypt, pynacl, cffi,
# pycparser, decorator, deprecated for Python 3.12) and work/ (provision.toml, sudo.toml)
# beside it; `sh .gpu13/run.sh` from the checkout's root. Results: bench/results/ubuntu-24.04-h200.
here=$(pwd)/.gpu13
if [ -z "$DEPS" ]; then  # a rehearsal elsewhere brings its own (DEPS=site-packages)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$here"/whl/*.whl || exit 1
  DEPS=/tmp/site
fi
export PYTHONPATH=$DEPS:$here/src PYTHONUNBUFFERED=1 COLUMNS=150 TERM=dumb
export PROVISION_INVENTORY=$here/work/provision.toml
cd "$here/work" || exit 1
t="$OUT/transcript.txt"
step() {  # step TITLE COMMAND...: the command, its output, its exit code and wall time
  title=$1; shift
  printf '\n===== %s\n$ %s\n' "$title" "$*" >> "$t"
  start=$(date +%s%N)
  "$@" >> "$t" 2>&1
  rc=$?
  printf -- '----- exit %s, %s ms\n' "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))" >> "$t"
}
{ echo "provision on the lent H200, $(date -u +%Y-%m-%dT%H:%M:%SZ)"; uname -a; cat /etc/os-release | head -2;
  python3 --version; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader;
  for c in sshd sudo visudo setfacl curl gpg systemctl useradd runuser flock docker; do
    printf '%s: %s\n' "$c" "$(command -v $c || echo missing)"; done
  echo "apt lists: $(ls /var/lib/apt/lists 2>/dev/null | grep -c _Packages) Packages files"; } > "$t"
python3 "$here/record_facts.py" "$PROVISION_INVENTORY" > "$OUT/facts-raw-before.txt"
step "facts --json" sh -c "python3 -m provision facts @local --json > $OUT/facts-local.json"
step "facts" python3 -m provision facts @local
step "host --plan" python3 -m provision host @local --plan
step "host (apply)" python3 -m provision host @local
step "host again (apply; what is left)" python3 -m provision host @local
step "host --plan --json (after)" sh -c "python3 -m provision host @local --plan --json > $OUT/host-plan-after.json"
step "doctor" python3 -m provision doctor @local --min-free-gb 10
step "sudo member without sudo installed (--only users)" python3 -m provision --inventory sudo.toml host @local --only users
step "state and what users/hf-cache made" sh -c 'cat /var/lib/provision/state.json; id alice; id bob; ls -la /data/cache/huggingface /home/alice/.cache /home/alice/.config; ls -la /home/alice/sd35-fp8/.devcontainer; grep -E "^(ARG BASE_IMAGE|torch)" /home/alice/sd35-fp8/.devcontainer/Dockerfile /home/alice/sd35-fp8/.devcontainer/requirements.txt'
python3 "$here/record_facts.py" "$PROVISION_INVENTORY" > "$OUT/facts-raw-after.txt"
echo done
