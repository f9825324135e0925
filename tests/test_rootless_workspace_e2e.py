"""Journey 1 in rootless mode, CPU only: `provision verify` builds and generates in the member's
own daemon, and "Reopen in Container" (the official Dev Containers CLI, as her over SSH) runs
her dev container as its root, which is her on the host: the workspace and the files she writes
into the shared cache are hers, and another member can read and write them."""

from __future__ import annotations

import json

import pytest

from provision.sandbox import DEMO_MEMBER
from tests.conftest import Host, converge

pytestmark = pytest.mark.sandbox

WORKSPACE = "~/sd35-fp8"
CACHE = "/data/cache/huggingface"


@pytest.fixture(scope="module")
def workstation(make_host) -> tuple[Host, dict]:
    """`provision sandbox up` (demo member dev; the CPU image's base and wheels on the host),
    rootless, with a second member, bob; then `provision host`."""
    host: Host = make_host(try_it=True, docker_mode="rootless")
    keys = {DEMO_MEMBER: host.sandbox.identity_file.parent / DEMO_MEMBER / "id_ed25519"}
    keys |= host.add_members(["bob"], gpus="none")
    report = converge(host)
    assert report["exit"] == 0, report["stderr"]
    return host, keys


def test_verify_builds_and_generates_in_her_own_daemon(workstation, tmp_path) -> None:
    host, keys = workstation
    result = host.cli("verify", host.name, "--member", DEMO_MEMBER, "--fp8", "storage",
                      "--json", "--out", str(tmp_path), timeout=1800)
    assert result.exit_code == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["runs"]["storage"]["fp8_applied"] == "storage"
    code, output = host.ssh(DEMO_MEMBER, keys[DEMO_MEMBER],
                            f"docker image inspect -f ok {report['image']}")
    assert code == 0 and output.strip() == "ok", output
    code, _ = host.exec(f"docker image inspect {report['image']}")
    assert code != 0  # not in the system daemon


def test_reopen_in_container_runs_as_her(workstation) -> None:
    host, keys = workstation
    host.install_devcontainer_cli()

    def as_dev(command: str) -> tuple[int, str]:
        return host.ssh(DEMO_MEMBER, keys[DEMO_MEMBER], command, timeout=1800)

    code, output = as_dev(f"devcontainer up --workspace-folder {WORKSPACE} 2>/dev/null")
    assert code == 0, output
    outcome = json.loads(output.strip().splitlines()[-1])
    assert outcome["outcome"] == "success" and outcome["remoteUser"] == "root"

    probe = ("import os; "
             "open(os.path.expanduser('~/.cache/huggingface/from-rootless'), 'w').write('x'); "
             "open('made-inside', 'w').write('y'); "
             "print(os.getuid(), os.environ['HF_TOKEN_PATH'])")
    code, output = as_dev(f"devcontainer exec --workspace-folder {WORKSPACE} "
                          f"python -c \"{probe}\" 2>/dev/null")
    assert code == 0, output
    uid, token_path = output.strip().splitlines()[-1].split()
    assert uid == "0" and token_path == "/root/.config/huggingface/token"
    for path in (f"{CACHE}/from-rootless", f"/home/{DEMO_MEMBER}/sd35-fp8/made-inside"):
        assert host.testinfra.file(path).user == DEMO_MEMBER, path
    code, output = host.ssh("bob", keys["bob"], f"cat {CACHE}/from-rootless && "
                                                f"echo more >> {CACHE}/from-rootless && "
                                                f"cat {CACHE}/from-rootless")
    assert code == 0 and output == "x" + "xmore\n", output  # read, then written by bob
