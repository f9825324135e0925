"""Journey 1 end to end, CPU only: `provision sandbox up`, `provision host`, then `provision
verify` building the team image and generating in it, and the member's workspace as VS Code's
"Reopen in Container" over Remote-SSH uses it (the official Dev Containers CLI run on the host,
as her, on the host's Docker)."""

from __future__ import annotations

import json
import time

import paramiko
import pytest
from PIL import Image

from provision.sandbox import DEMO_MEMBER
from tests.conftest import Host
from tests.dap import DapClient
from tests.test_converge import converge

pytestmark = pytest.mark.sandbox

WORKSPACE = "~/sd35-fp8"


@pytest.fixture(scope="module")
def workstation(make_host) -> tuple[Host, dict]:
    """Journey 1: `provision sandbox up` (its demo member `dev`, no GPU, the CPU image's base
    and wheels on the host), then `provision host`."""
    host: Host = make_host(try_it=True)
    report = converge(host)
    assert report["exit"] == 0, report["stderr"]
    return host, {DEMO_MEMBER: host.sandbox.identity_file.parent / DEMO_MEMBER / "id_ed25519"}


@pytest.fixture(scope="module")
def verified(workstation, tmp_path_factory) -> dict:
    """`provision verify` once: the image it builds serves the debug test too."""
    host, _ = workstation
    out = tmp_path_factory.mktemp("verify")
    result = host.cli("verify", host.name, "--fp8", "storage", "--json", "--out", str(out),
                      timeout=1800)
    assert result.exit_code == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_verify_builds_the_image_and_generates_in_fp8_storage(workstation, verified,
                                                              tmp_path) -> None:
    host, _ = workstation
    report = verified
    assert report["member"] == DEMO_MEMBER and report["image"].startswith("provision/sd35-fp8:")
    assert report["device_note"].startswith("CPU: no NVIDIA GPU")
    storage, off = report["runs"]["storage"], report["runs"]["off"]
    assert storage["fp8_requested"] == storage["fp8_applied"] == "storage"
    assert off["fp8_applied"] == "off"
    assert storage["device"] == "cpu" and storage["model"] == "tiny"
    assert storage["latents_shape"] == [1, 16, 16, 16]
    for key in ("torch", "diffusers", "step_ms_mean", "total_s", "peak_mem_gib", "load_s"):
        assert storage[key] is not None, key
    assert set(report["comparison"]) >= {"psnr_db", "cosine", "speedup_vs_bf16"}
    assert 0 < report["comparison"]["cosine"] <= 1
    with Image.open(report["png"]) as png:
        assert png.size == (128, 128)
        levels = [n for n in png.convert("L").histogram() if n]
        assert len(levels) > 10  # an image, not a flat fill

    again = host.cli("verify", host.name, "--member", DEMO_MEMBER, "--fp8", "dq", "--json",
                     "--out", str(tmp_path), timeout=1800)
    assert again.exit_code == 0, again.stderr[-3000:]
    cached = json.loads(again.stdout)
    assert cached["built"] is False and cached["image"] == report["image"]
    assert cached["runs"]["dq"]["fp8_applied"] == "storage"  # no GPU: the loud fallback


def test_reopen_in_container_with_the_official_cli(workstation) -> None:
    host, keys = workstation
    host.install_devcontainer_cli()

    def as_dev(command: str) -> tuple[int, str]:
        return host.ssh(DEMO_MEMBER, keys[DEMO_MEMBER], command, timeout=1200)

    code, output = as_dev(f"devcontainer read-configuration --workspace-folder {WORKSPACE} "
                            "2>/dev/null")
    assert code == 0, output
    assert json.loads(output.strip().splitlines()[-1])["configuration"]["remoteUser"] == DEMO_MEMBER

    code, output = as_dev(f"devcontainer up --workspace-folder {WORKSPACE} 2>/dev/null")
    assert code == 0, output
    outcome = json.loads(output.strip().splitlines()[-1])
    assert outcome["outcome"] == "success" and outcome["remoteUser"] == DEMO_MEMBER

    probe = ("import os, torch, diffusers; torch.float8_e4m3fn; "
             "t = os.environ['HF_TOKEN_PATH']; "
             "open(os.path.expanduser('~/.cache/huggingface/from-container'), 'w').write('x'); "
             "print(os.getuid(), oct(os.stat(os.path.dirname(t)).st_mode & 0o777), t, "
             "os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    code, output = as_dev(f"devcontainer exec --workspace-folder {WORKSPACE} "
                            f"python -c \"{probe}\" 2>/dev/null")
    assert code == 0, output
    uid, token_mode, token_path, inductor = output.strip().splitlines()[-1].split()
    assert uid == host.exec(f"id -u {DEMO_MEMBER}")[1].strip()  # updateRemoteUserUID
    assert token_mode == "0o700"
    assert token_path == f"/home/{DEMO_MEMBER}/.config/huggingface/token"
    assert inductor.endswith("sd35-fp8/.cache/torchinductor")
    shared = host.testinfra.file("/data/cache/huggingface/from-container")
    assert shared.exists and shared.user == DEMO_MEMBER and shared.group == "hfcache"


def test_a_breakpoint_before_the_vae_decode_shows_the_latents(workstation, verified) -> None:
    """The seed's debug path: inference.py under debugpy in the team image, the launch.json
    settings, the debug port reached through SSH as VS Code forwards it, a breakpoint on the
    line before the VAE decode, `latents.shape` read, then run to the end."""
    host, keys = workstation
    workspace = f"/home/{DEMO_MEMBER}/sd35-fp8"
    launch = json.loads(host.testinfra.file(f"{workspace}/.vscode/launch.json").content_string)
    config = next(c for c in launch["configurations"] if c["request"] == "launch")
    assert config["type"] == "debugpy" and config["justMyCode"] is False
    source = host.testinfra.file(f"{workspace}/inference.py").content_string
    line = next(n for n, text in enumerate(source.splitlines(), 1)
                if "# BREAKPOINT: latents before VAE decode" in text)
    uid = host.exec(f"id -u {DEMO_MEMBER}")[1].strip()
    code, output = host.exec(
        f"docker run -d --name debug-run -p 127.0.0.1:5678:5678 --user {uid} -e HOME=/tmp "
        f"-v {workspace}:/workspace -w /workspace {verified['image']} python -m debugpy "
        "--listen 0.0.0.0:5678 --wait-for-client inference.py --model tiny --fp8 storage "
        "--height 64 --width 96 --steps 2 --output /tmp/debug.png")
    assert code == 0, output
    client = paramiko.SSHClient()
    client.load_host_keys(str(host.sandbox.known_hosts))
    client.connect("127.0.0.1", host.sandbox.port, username=DEMO_MEMBER,
                   key_filename=str(keys[DEMO_MEMBER]), allow_agent=False, look_for_keys=False)
    try:
        deadline = time.monotonic() + 90
        while True:
            # debugpy listens a moment after the container starts; until then Docker's port
            # proxy takes the connection and drops it.
            try:
                channel = client.get_transport().open_channel(
                    "direct-tcpip", ("127.0.0.1", 5678), ("127.0.0.1", 0))
                dap = DapClient(channel)
                dap.request("initialize", adapterID="debugpy", clientID="provision-tests",
                            pathFormat="path", linesStartAt1=True, columnsStartAt1=True)
                break
            except (paramiko.ChannelException, ConnectionError, OSError):
                assert time.monotonic() < deadline, host.exec("docker logs debug-run")[1]
                time.sleep(1)
        dap.send("attach", justMyCode=config["justMyCode"])
        dap.wait("event", "initialized")
        breakpoints = dap.request("setBreakpoints", source={"path": "/workspace/inference.py"},
                                  breakpoints=[{"line": line}])
        assert breakpoints["breakpoints"][0]["verified"]
        dap.request("configurationDone")
        stopped = dap.wait("event", "stopped")["body"]
        assert stopped["reason"] == "breakpoint"
        frame = dap.request("stackTrace", threadId=stopped["threadId"])["stackFrames"][0]
        assert frame["line"] == line and frame["name"] == "decode"
        shape = dap.request("evaluate", expression="list(latents.shape)", frameId=frame["id"],
                            context="watch")
        assert shape["result"] == "[1, 16, 8, 12]"  # [1, 16, H/8, W/8]
        dap.request("continue", threadId=stopped["threadId"])
        dap.wait("event", "terminated")
    finally:
        client.close()
        logs = host.exec("timeout 120 docker wait debug-run; "
                         "docker logs debug-run 2>&1 | tail -n 3")[1]
        host.exec("docker rm -f debug-run")
    assert logs.splitlines()[0].strip() == "0", logs
