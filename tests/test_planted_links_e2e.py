"""Root never follows a path a member controls (issue 12).

Members plant links in their homes before provision first converges them: a hard link and a
symbolic link to /etc/shadow inside their own Hugging Face cache, a workspace that is a link to
/etc, a ~/.config that is a link to /root, a ~/.ssh that is a link to /root/.ssh. Provision writes
there as the member, so nothing outside her home changes, and the run says what it met.
"""

from __future__ import annotations

import pytest

from tests.conftest import Host, converge, plant, step_of

pytestmark = pytest.mark.sandbox

# What must never move: /etc/shadow (content, owner, group, mode) and all of /root.
OUTSIDE = ("stat -c '%U %G %a %h' /etc/shadow; md5sum /etc/shadow; "
           "find /root -printf '%p %u %g %m %s\\n' | sort")
# What dave's workspace would put in /etc if root wrote through his link.
WORKSPACE_IN_ETC = "ls -d /etc/.devcontainer /etc/.vscode /etc/inference.py /etc/README.md"


def test_planted_links_are_never_followed(make_host) -> None:
    # /home on the root with /etc, as on a one-disk server: there she can hard-link /etc/shadow.
    host: Host = make_host(one_filesystem=True)
    assert len(set(host.exec("stat -c %d /home /etc")[1].split())) == 1
    plant(host, "carol",
          "mkdir -p .cache/huggingface/hub/models--a--b/blobs "
          ".cache/huggingface/hub/models--a--b/snapshots/r1 && "
          "echo mine > .cache/huggingface/hub/models--a--b/blobs/abc && "
          "ln -s ../../blobs/abc .cache/huggingface/hub/models--a--b/snapshots/r1/model && "
          "chown -R carol:carol .cache && "
          "ln /etc/shadow .cache/huggingface/hub/hard-shadow && "
          "ln -s /etc/shadow .cache/huggingface/hub/soft-shadow && "
          "ln -s ../../../../etc/shadow .cache/huggingface/hub/relative-shadow && "
          "ln -s /root .cache/huggingface/hub/root")
    plant(host, "dave", "ln -s /etc sd35-fp8")
    _, before = host.exec(OUTSIDE)
    host.add_members(["carol", "dave"])
    report = converge(host, "--yes")
    _, after = host.exec(OUTSIDE)
    assert after == before
    # carol's own file and Hugging Face's relative link to it went into the shared cache; the
    # planted links (absolute or relative, out of the cache) stayed behind, reported.
    assert host.exec("cat /data/cache/huggingface/hub/models--a--b/blobs/abc")[1] == "mine\n"
    assert host.exec("cat /data/cache/huggingface/hub/models--a--b/snapshots/r1/model")[1] == \
        "mine\n"
    planted = {"hard-shadow", "soft-shadow", "relative-shadow", "root"}
    code, leftovers = host.exec("ls /home/carol/.cache/huggingface.provision-leftovers-*/hub")
    assert code == 0 and set(leftovers.split()) == planted
    for name in planted:
        assert host.exec(f"ls /data/cache/huggingface/hub/{name}")[0] != 0
    merged = step_of(report, "hf-cache")["message"]
    for name in planted:
        assert f"/home/carol/.cache/huggingface/hub/{name} not merged" in merged
    assert host.exec("readlink /home/carol/.cache/huggingface")[1].strip() == \
        "/data/cache/huggingface"
    # dave's workspace is a link to /etc: written as dave, the write fails and says where.
    workspace = step_of(report, "workspace")
    assert workspace["status"] == "failed" and "/home/dave/sd35-fp8" in workspace["message"]
    code, output = host.exec(WORKSPACE_IN_ETC)
    assert code != 0 and "/etc/" not in output.replace("cannot access '/etc/", ""), output
    assert report["exit"] != 0

    # ~/.config a link to /root: her token directory cannot be made through it.
    plant(host, "erin", "ln -s /root .config")
    host.add_members(["erin"])
    _, before = host.exec(OUTSIDE)
    report = converge(host, "--yes")
    assert host.exec(OUTSIDE)[1] == before
    hf_cache = step_of(report, "hf-cache")
    assert hf_cache["status"] == "failed" and "huggingface" in hf_cache["message"]

    # ~/.ssh a link to /root/.ssh: her keys are never written into root's.
    plant(host, "frank", "mkdir -p /root/.ssh && ln -s /root/.ssh .ssh")
    host.add_members(["frank"])
    _, before = host.exec(OUTSIDE)
    plan = host.cli("host", host.name, "--plan")
    assert "/home/frank/.ssh is a link to /root/.ssh" in " ".join(plan.stdout.split()), plan.stdout
    report = converge(host, "--yes")
    assert host.exec(OUTSIDE)[1] == before
    assert step_of(report, "users")["status"] == "failed"
