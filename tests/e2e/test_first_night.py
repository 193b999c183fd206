"""A user's first night, through the real CLI: an unwritable run directory ends in one
clear error and no restart loop, a full disk under the log does not stop training,
console lines lead with what a person scans for, the progress bar says when training
ends and why, times read as local clock times and durations (JSON keeps numbers), and
an offline hub dataset is a temporary failure (75).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from runs import ENV, TOTAL, cli, events

XDG = Path(ENV["XDG_STATE_HOME"]) / "mathlora-daemon"


def _records() -> list[Path]:
    return sorted(XDG.glob("unwritable-*.json")) if XDG.is_dir() else []


def test_an_unwritable_run_dir_is_one_error_and_no_restart_loop(template_dir, tmp_path):
    run = shutil.copytree(template_dir, tmp_path / "run")
    shutil.rmtree(run / "state", ignore_errors=True)
    (run / "state").write_text("a file where the daemon keeps its state directory\n")
    before = set(_records())

    # launchd's first start: a clear error naming the path, exit 78 (not 1, a crash) ...
    first = cli("run", run=run)
    assert first.returncode == 78, first.stderr
    assert "Traceback" not in first.stdout + first.stderr
    assert "cannot be written" in first.stderr and str(run / "state") in first.stderr, first.stderr
    new = set(_records()) - before
    assert len(new) == 1, "the failure is recorded outside the run directory it cannot write"
    assert json.loads(new.pop().read_text())["run_dir"] == str(run.resolve())

    # ... and its restart exits 0 (launchd stops restarting), saying what to do.
    second = cli("run", run=run)
    assert second.returncode == 0, second.stderr
    assert "not starting" in second.stderr and "fix it, then start again" in second.stderr, second.stderr
    assert not (run / "checkpoints").exists() and (run / "state").is_file()

    # Fixed by the user: the next start trains, and the record is gone.
    (run / "state").unlink()
    third = cli("run", run=run, timeout=300)
    assert third.returncode == 0, third.stderr
    assert [e["step"] for e in events(run, "train.step")][-1] == TOTAL
    assert not set(_records()) - before


def test_console_lines_lead_with_event_step_loss_and_speed_and_the_log_keeps_every_field(template_dir, tmp_path):
    run = shutil.copytree(template_dir, tmp_path / "run")
    result = cli("run", "--set", "train.max_steps=10", run=run, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if " train.step " in line]
    assert lines, result.stderr
    for line in lines:
        # "17:45:05 [info     ] train.step   step=10 loss=5.42 tok_per_s=2896.1 epoch=1 ..."
        assert re.match(r"^\d\d:\d\d:\d\d \[info\s*\] train\.step\s+step=\d+ loss=\S+ tok_per_s=\S+ epoch=", line), line
        assert line.rstrip().endswith("run=run"), line
    step = events(run, "train.step")[-1]
    for field in ("ts", "level", "run", "step", "loss", "lr", "tokens", "tok_per_s", "budget_used_s", "budget_left_s"):
        assert field in step, field


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full (a device that is always full) is Linux's")
def test_a_full_disk_under_the_log_does_not_stop_training(template_dir, tmp_path):
    run = shutil.copytree(template_dir, tmp_path / "run")
    (run / "logs").mkdir(exist_ok=True)
    os.symlink("/dev/full", run / "logs" / "daemon.jsonl")  # every write: ENOSPC
    result = cli("run", run=run, timeout=300)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "Logging error" not in output, output[-3000:]
    assert result.returncode == 0, output[-3000:]
    assert output.count("cannot write the log file") == 1, output[-3000:]
    assert (run / "adapters" / "adapters.safetensors").is_file()
    assert json.loads((run / "state" / "status.json").read_text())["state"] == "finished"


def _run_on_a_terminal(run: Path, *args: str, timeout: float = 300) -> tuple[int, str]:
    """Run the daemon with stderr on a pseudo-terminal (so it draws its progress bar);
    return (exit code, everything written there)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # a 200-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "mathlora_daemon", "run", "--run-dir", str(run), *args],
                            env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


def test_the_progress_bar_shows_when_training_ends_and_what_ends_it(template_dir, tmp_path):
    run = shutil.copytree(template_dir, tmp_path / "run")
    code, screen = _run_on_a_terminal(run)
    assert code == 0, screen[-3000:]
    # 32 steps of a tiny model end long before a 16 h budget: the steps end training.
    screen = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", screen)  # colours and cursor moves
    ends = re.findall(r"\[ends (\d\d:\d\d): (steps|budget|window)\]", screen)
    assert ends and {limit for _, limit in ends} == {"steps"}, screen[-3000:]

    # A budget that runs out first: the bar says so.
    run2 = shutil.copytree(template_dir, tmp_path / "run2")
    # 800 steps against a ~3 s budget: the budget ends it, however fast the machine.
    code, screen = _run_on_a_terminal(run2, "--set", "daemon.budget_hours=0.0008", "--set", "train.epochs=100")
    assert code == 0, screen[-3000:]
    screen = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", screen)
    assert re.search(r"\[ends \d\d:\d\d: budget\]", screen), screen[-3000:]


def test_times_read_as_clock_times_and_durations_and_json_keeps_numbers(reference, tmp_path):
    run = shutil.copytree(reference["dir"], tmp_path / "run")
    status = cli("status", run=run)
    assert status.returncode == 0
    budget = next(line for line in status.stdout.splitlines() if line.startswith("budget"))
    assert re.search(r"used \d+ s, left 15 h 59 min of 16 h", budget), budget
    assert "adapters" in status.stdout and "mathlora-daemon generate --run-dir" in status.stdout, status.stdout
    raw = json.loads(cli("status", "--json", run=run).stdout)
    assert isinstance(raw["budget_used_s"], float) and raw["budget_total_s"] == 57600.0

    listed = cli("checkpoints", "list", run=run)
    assert listed.returncode == 0
    assert all(re.search(r"\d\d:\d\d \((\d+ s|\d+ min|\d+ h( \d+ min)?) ago\)", line)
               for line in listed.stdout.splitlines()), listed.stdout
    rows = json.loads(cli("checkpoints", "list", "--json", run=run).stdout)["checkpoints"]
    assert rows and all(isinstance(r["created"], float) for r in rows)

    shown = cli("logs", "-n", "3", run=run)
    assert all(re.match(r"^\d\d:\d\d:\d\d ", line) for line in shown.stdout.splitlines()), shown.stdout


def test_an_offline_hub_dataset_is_a_temporary_failure(reference, tmp_path):
    run = shutil.copytree(reference["dir"], tmp_path / "run")
    result = cli("eval", "--data", "hub:HuggingFaceH4/MATH-500", "--limit", "1", "--no-base", run=run)
    assert result.returncode == 75, result.stderr  # ENV sets HF_HUB_OFFLINE=1: no network
    assert "Traceback" not in result.stderr
    assert "hub:HuggingFaceH4/MATH-500" in result.stderr and "could not be downloaded" in result.stderr
