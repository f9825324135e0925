"""`provision gpus`, parsed: transcripts of templates/host/gpu-usage.sh.j2 → who uses which GPU.

tests/fixtures/gpus/: one RECORDED on a sandbox (its nvidia-smi a stand-in reporting real
processes' pids), two WRITTEN BY HAND (cgroup v2 hosts, rootful and rootless, never recorded
here); each says so in its header. The small transcripts inline below are written by hand too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from provision import views
from provision.doctor import gpu_use_checks
from provision.errors import InventoryError, RemoteCommandFailed
from provision.gpus import (
    GpuReport,
    parse_duration,
    parse_usage,
    unowned,
)
from provision.inventory import Inventory, Member

FIXTURES = Path(__file__).parent / "fixtures" / "gpus"
TWO_HOURS = 7200


def team(**gpus: str) -> Inventory:
    return Inventory(path=Path("provision.toml"),
                     members=tuple(Member(name, (), gpus=g) for name, g in gpus.items()))


def read(fixture: str, inventory: Inventory, idle_after: int = TWO_HOURS) -> GpuReport:
    return parse_usage((FIXTURES / fixture).read_text(), inventory, "gpu-01", idle_after)


def by_pid(report: GpuReport) -> dict[tuple[int, int], object]:
    return {(p.gpu, p.pid): p for p in report.processes}


def test_recorded_sandbox_names_her_rootless_container_his_native_process_and_the_service(
        ) -> None:
    report = read("sandbox-rootless-standin.txt", team(alice="0", bob="0"))
    found = by_pid(report)
    napper = found[(0, 2196)]
    assert napper.owner == "member alice" and napper.member == "alice"
    assert napper.container is not None
    assert (napper.container.name, napper.container.image, napper.container.daemon) == (
        "napper", "provision/debian:bookworm-minbase", "rootless: alice")
    # The sandbox's own container id sits above every path: it is not a container of the host.
    for pid in (2263, 2261):
        assert found[(0, pid)].container is None
    assert found[(1, 2264)].owner == "member bob" and found[(1, 2264)].container is None
    assert found[(0, 2263)].owner == "service"
    assert found[(0, 2261)].owner == "other: root"
    assert report.unused == (2,)
    assert [a.line for a in report.assignments] == [
        "alice: assigned 0, using 0 and 1 (outside her assignment: 1)",
        "bob: assigned 0, using 1 (outside her assignment: 1)"]


def test_rootful_host_attributes_by_uid_and_the_system_daemon() -> None:
    report = read("rootful-v2.handwritten.txt", team(dev01="0", dev02="1"))
    found = by_pid(report)
    dev = found[(0, 4101)]
    assert dev.owner == "member dev01" and dev.running_s == 93784
    assert dev.container is not None
    assert (dev.container.name, dev.container.image, dev.container.daemon) == (
        "dev01-sd35", "vsc-sd35-fp8-3f2a1b", "system")
    assert found[(3, 4102)].owner == "member dev01" and found[(3, 4102)].container is None
    assert found[(1, 5200)].owner == "service"  # root's processes, in the container sd35-api
    assert found[(1, 6100)].owner == "other: carol"
    assert found[(0, 7000)].owner == "unknown" and found[(0, 7000)].comm == "exited"
    assert [a.line for a in report.assignments] == [
        "dev01: assigned 0, using 0 and 3 (outside her assignment: 3)",
        "dev02: assigned 1, using none"]
    assert report.unused == (2,)
    assert [(p.gpu, p.pid) for p in unowned(report)] == [(1, 6100)]


def test_idle_is_measured_from_the_last_refresh_that_saw_it_busy() -> None:
    report = read("rootful-v2.handwritten.txt", team(dev01="0"))
    found = by_pid(report)
    assert found[(0, 4101)].idle_s == 8000 and found[(0, 4101)].idle  # busy 8000 s ago
    assert found[(1, 5200)].idle_s == 0 and not found[(1, 5200)].idle  # its GPU is busy now
    # Never seen busy: from the first refresh that saw it (600 s ago), under the threshold.
    assert found[(3, 4102)].idle_s == 600 and not found[(3, 4102)].idle
    assert read("rootful-v2.handwritten.txt", team(dev01="0"), idle_after=600
                ).processes[-1].idle


def test_rootless_host_owner_is_the_daemons_and_a_cut_record_leaves_the_id() -> None:
    report = read("rootless-v2.handwritten.txt", team(dev01="0", dev02="all"))
    found = by_pid(report)
    dev02 = found[(0, 8100)]  # a subordinate uid of hers, in her daemon's container
    assert dev02.owner == "member dev02"
    assert dev02.container is not None and dev02.container.name == "dev02-sd35"
    assert dev02.container.daemon == "rootless: dev02"
    service = found[(1, 8200)]
    assert service.owner == "service" and service.container is not None
    assert service.container.daemon == "rootless: sd35-api"
    cut = found[(1, 8300)]
    assert cut.owner == "member dev01" and cut.memory_mib is None
    assert cut.container is not None and cut.container.name is None
    assert cut.container.id.startswith("eeee")
    # [N/A] utilisation: no history makes it idle, however old its record.
    assert dev02.idle_s == 100000 and not dev02.idle
    assert [a.line for a in report.assignments] == [
        "dev01: assigned 0, using 1 (outside her assignment: 1)",
        "dev02: assigned all, using 0"]
    assert unowned(report) == ()


def test_the_json_and_the_table_carry_the_same_facts() -> None:
    report = read("rootful-v2.handwritten.txt", team(dev01="0", dev02="1"))
    document = report.to_json()
    console = Console(width=220, record=True)
    console.print(views.gpus_view(report))
    table = console.export_text()
    for gpu in document["gpus"]:
        for process in gpu["processes"]:
            assert str(process["pid"]) in table and process["owner"] in table
            if process["container"]:
                assert process["container"]["name"] in table
                assert process["container"]["daemon"] in table
    for line in (a["line"] for a in document["assignments"]):
        assert line in table
    assert "unused: GPU 2" in table and "idle 2h 13m" in table


NO_SMI = "@@@provision:now\n1800000000\n@@@provision:smi\nmissing\n@@@provision:end\n"
NO_DEVICES = ("@@@provision:now\n1800000000\n@@@provision:smi\nexit=6\n"
              "No devices were found\n@@@provision:end\n")
DRIVER_GONE = ("@@@provision:now\n1800000000\n@@@provision:smi\nexit=9\nNVIDIA-SMI has failed "
               "because it couldn't communicate with the NVIDIA driver.\n@@@provision:end\n")


@pytest.mark.parametrize("transcript", [NO_SMI, NO_DEVICES])
def test_no_gpu_is_one_line(transcript: str) -> None:
    """Written by hand: no nvidia-smi, or one that finds no device."""
    report = parse_usage(transcript, team(), "cpu-01", TWO_HOURS)
    assert report.no_gpu and report.to_json()["gpus"] == []
    console = Console(width=120, record=True)
    console.print(views.gpus_view(report))
    assert console.export_text() == "cpu-01: no NVIDIA GPU on this host\n"
    checks = gpu_use_checks(report, ())
    assert [c.status for c in checks] == ["skip", "skip"]


def test_a_failing_nvidia_smi_is_an_error_naming_it() -> None:
    """Written by hand: the driver does not answer."""
    with pytest.raises(RemoteCommandFailed, match="couldn't communicate with the NVIDIA driver"):
        parse_usage(DRIVER_GONE, team(), "gpu-01", TWO_HOURS)


def test_doctor_warns_of_gpus_outside_assignments_and_of_outsiders() -> None:
    inventory = team(dev01="0", dev02="1")
    checks = {c.name: c for c in gpu_use_checks(read("rootful-v2.handwritten.txt", inventory),
                                                 inventory.members)}
    outside = checks["GPUs within assignments"]
    assert outside.status == "warn" and "dev01: assigned 0, using 0 and 3" in outside.evidence
    strays = checks["GPU memory held by the team"]
    assert strays.status == "warn" and "pid 6100 (python) of other: carol" in strays.evidence
    calm = gpu_use_checks(read("rootless-v2.handwritten.txt", team(dev01="all", dev02="all")),
                          inventory.members)
    assert [c.status for c in calm] == ["pass", "pass"]


@pytest.mark.parametrize(("text", "seconds"), [("2h", 7200), ("90m", 5400), ("1d", 86400),
                                                ("45s", 45), ("300", 300)])
def test_idle_after_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


def test_a_bad_duration_names_the_form() -> None:
    with pytest.raises(InventoryError, match="30m, 2h or 1d"):
        parse_duration("two hours")


def test_the_h200_recorded_names_the_service_and_the_container_it_cannot_tie_to_dev() -> None:
    """Recorded on the lent H200 (rootful): the service's container is the service; a plain
    `docker run` by dev in the system daemon carries nothing of hers (it runs as the image's
    uid), so it is said as the host account it runs as, with its container."""
    report = read("h200-rootful.recorded.txt", team(dev="0"))
    found = {p.pid: p for g in report.gpus for p in g.processes}
    assert found[8571].owner == "service" and found[8571].container.name == "sd35-api"
    assert found[9326].owner == "other: ubuntu"
    assert (found[9326].container.name, found[9326].container.daemon) == ("dev-holder", "system")


def test_a_dev_container_in_the_system_daemon_is_hers_by_its_folder() -> None:
    """The recorded H200 transcript with one line changed by hand: dev-holder given the fourth
    field the script now prints for a dev container (the owner of its devcontainer.local_folder
    label): whatever uid it runs as, it is dev's, and counts against her assignment."""
    text = (FIXTURES / "h200-rootful.recorded.txt").read_text().replace(
        " dev-holder provision/sd35-fp8:f1d6b2ed0556\n",
        " dev-holder provision/sd35-fp8:f1d6b2ed0556 dev\n")
    report = parse_usage(text, team(dev="0"), "@local", TWO_HOURS)
    (holder,) = [p for g in report.gpus for p in g.processes if p.pid == 9326]
    assert (holder.owner, holder.container.made_for) == ("member dev", "dev")
    assert [a.line for a in report.assignments] == ["dev: assigned 0, using 0"]
