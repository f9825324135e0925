"""The CLI boundary as a user meets it.

Usage errors are typer's own message on stderr with exit 2; everything provision raises is one
line with its own exit code and no traceback (the detail only under -v, which may follow the
subcommand); Ctrl-C is one line and exit 130; malformed input is one line and leaves the file
as it was. The paths a review found escaping as tracebacks are each pinned here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.sandbox import new_key_pair
from tests.conftest import run_cli

USAGE_ERRORS = [
    ("host", "--bogus"),
    ("nosuchcmd",),
    ("facts",),
    ("host",),
    ("doctor", "gpu-01", "--min-free-gb", "lots"),
    ("team", "add", "bob"),
    ("sandbox", "up", "--nope"),
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=" ".join)
def test_usage_errors_are_typers_message_and_exit_2(args: tuple[str, ...],
                                                    tmp_path: Path) -> None:
    result = run_cli(*args, inventory=tmp_path / "provision.toml", home=tmp_path)
    assert result.exit_code == 2, result.stderr
    assert "Usage: provision" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_no_arguments_prints_the_help(tmp_path: Path) -> None:
    result = run_cli(inventory=tmp_path / "provision.toml", home=tmp_path)
    output = result.stdout + result.stderr
    assert "Usage: provision" in output and "onboard" in output and "Traceback" not in output


def test_help_exits_0(tmp_path: Path) -> None:
    result = run_cli("host", "--help", inventory=tmp_path / "provision.toml", home=tmp_path)
    assert result.exit_code == 0 and "--plan" in result.stdout


def test_a_provision_error_is_one_line(tmp_path: Path) -> None:
    result = run_cli("host", "gpu-01", inventory=tmp_path / "provision.toml", home=tmp_path)
    assert result.exit_code == 2
    assert result.error_lines == [f"error: {tmp_path / 'provision.toml'}: no such inventory: "
                                  "run 'provision init' to write one, or pass --inventory PATH"]


def test_verbose_may_follow_the_subcommand(tmp_path: Path) -> None:
    result = run_cli("host", "gpu-01", "-v", "--plan", inventory=tmp_path / "provision.toml",
                     home=tmp_path)
    assert result.exit_code == 2, result.stderr
    assert "No such option" not in result.stderr
    assert result.error_lines[-1].startswith("error: ") and "no such inventory" in result.stderr
    assert len(result.error_lines) > 1  # -v: the traceback above the line


def test_a_bad_fp8_mode_is_one_line_before_anything_else(tmp_path: Path) -> None:
    result = run_cli("verify", "gpu-01", "--fp8", "fast", inventory=tmp_path / "provision.toml",
                     home=tmp_path)
    assert result.exit_code == 2
    assert result.error_lines == ["error: --fp8 'fast': use off, storage or dq"]


def test_team_add_on_malformed_toml_is_one_line_and_leaves_the_file(tmp_path: Path) -> None:
    inventory = tmp_path / "provision.toml"
    inventory.write_text('[defaults]\ncache_dir = "/srv/hf"\n[[members]\nname = "x"\n')
    before = inventory.read_bytes()
    new_key_pair(tmp_path)
    result = run_cli("team", "add", "bob", "--key", str(tmp_path / "id_ed25519.pub"),
                     inventory=inventory, home=tmp_path)
    assert result.exit_code == 2, result.stderr
    assert len(result.error_lines) == 1 and "Traceback" not in result.stderr
    assert f"{inventory}:3: not valid TOML" in result.stderr
    assert inventory.read_bytes() == before


def _blocked_reading_stdin(pid: int) -> bool:
    """The process sits in read(0, …): /proc/PID/syscall names the call and its first arg."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return fields[:2] == ["0", "0x0"]


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """SIGINT while the CLI waits for the sudo password on stdin (a pipe, as in a script)."""
    inventory = tmp_path / "provision.toml"
    inventory.write_text('[hosts.gpu-01]\nhostname = "127.0.0.1"\nport = 9\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "provision", "--ask-sudo-pass", "facts", "gpu-01"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HOME": str(tmp_path), "PROVISION_INVENTORY": str(inventory)})
    deadline = time.monotonic() + 60
    while not _blocked_reading_stdin(process.pid):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "never reached the password prompt"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), stderr
    assert stdout == ""


def test_end_of_input_at_the_password_prompt_is_one_line(tmp_path: Path) -> None:
    inventory = tmp_path / "provision.toml"
    inventory.write_text('[hosts.gpu-01]\nhostname = "127.0.0.1"\nport = 9\n')
    result = run_cli("--ask-sudo-pass", "facts", "gpu-01", inventory=inventory, home=tmp_path,
                     stdin="")
    assert result.exit_code == 7
    assert result.error_lines == ["error: no sudo password was given (end of input): type it at "
                                  "the prompt, or drop --ask-sudo-pass for an admin with "
                                  "NOPASSWD sudo"]


def test_ctrl_c_during_a_converge_is_one_line_and_a_rerun_converges(own_host) -> None:
    """Ctrl-C while a step is being applied on a real host: the CLI says so in one line and exits
    130 at once; what the host received runs to its end, and the next run converges."""
    host = own_host
    process = subprocess.Popen(
        [sys.executable, "-m", "provision", "host", host.name], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=host.inventory.parent,
        env={**os.environ, "HOME": str(host.home), "PROVISION_INVENTORY": str(host.inventory)})
    deadline = time.monotonic() + 120
    while host.exec("ls /var/lib/provision/apply-*.log")[0] != 0:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no step was applied"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert time.monotonic() - started < 10  # not after the host's work is done
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), stderr
    assert "Traceback" not in stdout

    again = host.cli("host", host.name)
    assert again.exit_code == 0, again.stderr
    assert host.cli("host", host.name, "--check").exit_code == 0


def test_a_command_runs_without_importing_pydantic(tmp_path: Path) -> None:
    """typer 0.29 validates every option through pydantic, whose import alone cost each command
    ~60 ms (pyproject.toml keeps typer below it): a whole `host` run, options parsed, must not
    import it."""
    code = ("import sys\nfrom provision import cli\n"
            "sys.argv = ['provision', 'host', 'gpu-01', '--plan', '--only', 'users']\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print('pydantic imported:', 'pydantic' in sys.modules)")
    env = {**os.environ, "PROVISION_INVENTORY": str(tmp_path / "provision.toml"),
           "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert "inventory" in done.stderr, done.stderr  # it ran: no inventory there, one line
    assert done.stdout.strip().splitlines()[-1] == "pydantic imported: False"
