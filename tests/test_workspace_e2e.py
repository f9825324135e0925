"""Journey 1 end to end, CPU only: `provision sandbox up`, `provision host`, then `provision
verify` building the team image and generating in it, and the member's workspace as VS Code's
"Reopen in Container" over Remote-SSH uses it (the official Dev Containers CLI run on the host,
as her, on the host's Docker)."""

from __future__ import annotations

import json
import shlex
import time

import paramiko
import pytest
from PIL import Image

from provision.render import DEBUG_LAUNCH
from provision.sandbox import DEMO_MEMBER
from tests.conftest import Host, converge
from tests.dap import ATTENTION_HELPER_CHECK, DapClient, first_statement_line

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


def test_f5_stops_in_attention_the_scheduler_and_before_the_decode_and_a_change_is_decoded(
        workstation, verified) -> None:
    """The seed's debug path as VS Code runs it: inference.py under debugpy in the team image
    with the rendered "Debug SD3.5 FP8" arguments plus `--compile` (which the debugger must
    overrule), the debug port reached through SSH as Remote-SSH forwards it. A breakpoint in
    diffusers' JointAttnProcessor2_0.__call__ hits (nothing was compiled) and the workspace's
    attention helper gives rows summing to 1 over the image tokens; one in the scheduler's
    `step` hits (the seed steps into it; test_debugger_pythons covers 3.12+); at the one before
    the VAE decode `latents` is [1, 16, H/8, W/8], and zeros set from the debug console are
    what the VAE decodes. The same arguments with --attention-maps write one PNG per prompt
    token."""
    host, keys = workstation
    workspace = f"/home/{DEMO_MEMBER}/sd35-fp8"
    image = verified["image"]
    launch = json.loads(host.testinfra.file(f"{workspace}/.vscode/launch.json").content_string)
    config = next(c for c in launch["configurations"] if c["name"] == DEBUG_LAUNCH)
    assert config["type"] == "debugpy" and config["justMyCode"] is False
    assert "noDebug" not in config
    flags = dict(zip(config["args"][::2], config["args"][1::2], strict=True))
    args = shlex.join(config["args"])
    source = host.testinfra.file(f"{workspace}/inference.py").content_string
    decode_line = next(n for n, text in enumerate(source.splitlines(), 1)
                       if "# BREAKPOINT: latents before VAE decode" in text)
    code, site = host.exec(f"docker run --rm {image} python -c \"import importlib.util as u; "
                           "print(u.find_spec('diffusers').submodule_search_locations[0])\"")
    assert code == 0, site
    processor = f"{site.strip()}/models/attention_processor.py"
    scheduler = f"{site.strip()}/schedulers/scheduling_flow_match_euler_discrete.py"
    code, text = host.exec(f"docker run --rm {image} cat {processor}")
    assert code == 0, text
    attention_line = first_statement_line(text, "JointAttnProcessor2_0", "__call__")
    code, text = host.exec(f"docker run --rm {image} cat {scheduler}")
    assert code == 0, text
    step_line = first_statement_line(text, "FlowMatchEulerDiscreteScheduler", "step")
    uid = host.exec(f"id -u {DEMO_MEMBER}")[1].strip()
    in_image = (f"--user {uid} -e HOME=/tmp -e HF_HUB_OFFLINE=1 -v {workspace}:/workspace "
                f"-w /workspace {image}")
    code, output = host.exec(
        f"docker run -d --name debug-run -p 127.0.0.1:5678:5678 {in_image} python -m debugpy "
        f"--listen 0.0.0.0:5678 --wait-for-client inference.py {args} --compile "
        "--output outputs/zeroed.png --metrics outputs/zeroed.json")
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
                dap = DapClient(channel, timeout=300)
                dap.request("initialize", adapterID="debugpy", clientID="provision-tests",
                            pathFormat="path", linesStartAt1=True, columnsStartAt1=True)
                break
            except (paramiko.ChannelException, ConnectionError, OSError):
                assert time.monotonic() < deadline, host.exec("docker logs debug-run")[1]
                time.sleep(1)
        dap.send("attach", justMyCode=config["justMyCode"])
        dap.wait("event", "initialized")
        dap.request("setExceptionBreakpoints", filters=["uncaught"])  # VS Code's default
        for path, line in ((processor, attention_line), (scheduler, step_line),
                           ("/workspace/inference.py", decode_line)):
            placed = dap.request("setBreakpoints", source={"path": path},
                                 breakpoints=[{"line": line}])["breakpoints"][0]
            assert (placed["verified"], placed["line"]) == (True, line), placed
        dap.request("configurationDone")

        stopped = dap.wait("event", "stopped")["body"]
        assert stopped["reason"] == "breakpoint"
        frame = dap.request("stackTrace", threadId=stopped["threadId"])["stackFrames"][0]
        assert (frame["name"], frame["line"]) == ("__call__", attention_line)
        assert frame["source"]["path"] == processor
        shape, worst = json.loads(dap.request(
            "evaluate", expression=ATTENTION_HELPER_CHECK, frameId=frame["id"],
            context="repl")["result"])
        side = int(flags["--height"]) // 16, int(flags["--width"]) // 16
        assert shape == [77 + 256, side[0] * side[1]]  # CLIP + T5 positions x image tokens
        assert worst < 1e-4
        dap.request("setBreakpoints", source={"path": processor}, breakpoints=[])
        dap.request("continue", threadId=stopped["threadId"])

        stopped = dap.wait("event", "stopped")["body"]
        frame = dap.request("stackTrace", threadId=stopped["threadId"])["stackFrames"][0]
        assert (frame["name"], frame["line"]) == ("step", step_line)  # the scheduler's
        assert frame["source"]["path"] == scheduler
        dap.request("setBreakpoints", source={"path": scheduler}, breakpoints=[])
        dap.request("continue", threadId=stopped["threadId"])

        stopped = dap.wait("event", "stopped")["body"]
        frame = dap.request("stackTrace", threadId=stopped["threadId"])["stackFrames"][0]
        assert (frame["name"], frame["line"]) == ("decode", decode_line)

        def evaluate(expression: str, context: str = "watch") -> str:
            return dap.request("evaluate", expression=expression, frameId=frame["id"],
                               context=context)["result"]

        assert evaluate("list(latents.shape)") == str([1, 16, side[0] * 2, side[1] * 2])
        evaluate("latents = torch.zeros_like(latents)", context="repl")
        assert evaluate("float(latents.abs().max())") == "0.0"
        dap.request("continue", threadId=stopped["threadId"])
        dap.wait("event", "terminated")
    finally:
        client.close()
        logs = host.exec("timeout 120 docker wait debug-run; "
                         "docker logs debug-run 2>&1 | tail -n 3")[1]
        host.exec("docker rm -f debug-run")
    assert logs.splitlines()[0].strip() == "0", logs
    zeroed = json.loads(host.testinfra.file(f"{workspace}/outputs/zeroed.json").content_string)
    assert zeroed["compiled"] is False and "debug" in zeroed["compile_skipped_reason"]

    outputs = f"{workspace}/outputs"
    code, output = host.exec(
        f"docker run --rm {in_image} python inference.py {args} --output outputs/reference.png "
        f"--attention-maps outputs/attention >/dev/null 2>{outputs}/reference.log "
        f"|| {{ tail -n 5 {outputs}/reference.log; exit 9; }}; "
        f"cmp -s {outputs}/zeroed.png {outputs}/reference.png; echo $?; ls {outputs}/attention")
    assert code == 0, output
    lines = output.split()
    assert lines[0] == "1", "the PNG decoded from zeroed latents differs from the unchanged run"
    tokens = [name for name in lines[1:] if name.startswith("token-")]
    assert len(tokens) == len(flags["--prompt"])  # the tiny model's tokenizer: one per character
    assert "overlay.png" in lines
