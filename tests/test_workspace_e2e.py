"""Journey 1 end to end, CPU only: `provision sandbox up`, `provision host`, then `provision
verify` building the team image and generating in it, and the member's workspace as VS Code's
"Reopen in Container" over Remote-SSH uses it (the official Dev Containers CLI run on the host,
as her, on the host's Docker)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from provision.sandbox import DEMO_MEMBER
from tests.conftest import Host
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


def test_verify_builds_the_image_and_generates_in_fp8_storage(workstation, tmp_path) -> None:
    host, _ = workstation
    result = host.cli("verify", host.name, "--fp8", "storage", "--json",
                      "--out", str(tmp_path), timeout=1800)
    assert result.exit_code == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
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
