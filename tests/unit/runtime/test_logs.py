"""The JSON log file on a disk that fills up: a line is in the file whole or not at all,
and a file left without its final newline gets one before the next line.

The full disk is real: a tiny tmpfs mounted for the test (root, as the tests run here),
filled to its last page by a filler file, so the kernel cuts the log's write short and
then answers ENOSPC, as a laptop's full disk does.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from mathlora_daemon.cli.watch import logs_main
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.logs import close_logging, setup_logging

PAGE = 4096  # tmpfs hands out whole pages


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs, unmounted (with every log handler closed) after the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)], check=True,
                   capture_output=True)
    try:
        yield mnt
    finally:
        close_logging()
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)


def fill(path: Path) -> None:
    """Write zeros into `path` until the file system says it is full."""
    with open(path, "wb", buffering=0) as fh:
        with pytest.raises(OSError) as excinfo:
            while True:
                fh.write(b"\0" * PAGE)
    assert excinfo.value.errno == errno.ENOSPC


def log_bytes(run: Path) -> bytes:
    return (run / "logs" / "daemon.jsonl").read_bytes()


def test_a_line_cut_short_by_a_full_disk_is_taken_back(small_disk, capsys):
    run = small_disk / "run"
    (run / "logs").mkdir(parents=True)
    # A line torn by an earlier start (a power loss mid-write): no final newline.
    torn = b'{"ts": "2025-03-01T22:15:07Z", "level": "info", "event": "train.st'
    (run / "logs" / "daemon.jsonl").write_bytes(torn)
    log = setup_logging(RunDir(run), "night", console=False)
    log.info("train.step", step=1, loss=2.5)
    intact = log_bytes(run)
    assert intact.startswith(torn + b"\n") and intact.endswith(b"\n")

    fill(small_disk / "filler")
    # The log's last page still has room for the start of the next line and no more:
    # the kernel writes part of it, then ENOSPC (the half line the old code left).
    assert 0 < PAGE - len(intact) % PAGE < 9000
    log.info("train.step", step=2, loss=2.4, note="x" * 9000)
    assert log_bytes(run) == intact  # nothing of it: no half line to glue the next one onto
    err = capsys.readouterr().err
    assert "cannot write the log file" in err and "No space left on device" in err

    # The next start's first line fits in what is left: it lands whole, on a line of its own.
    log.info("daemon.start", pid=os.getpid())
    close_logging()
    assert "is written again" in capsys.readouterr().err
    lines = log_bytes(run).split(b"\n")
    assert lines[0] == torn and lines[-1] == b""
    records = [json.loads(line) for line in lines[1:-1]]  # every other line whole
    assert [(r["event"], r.get("step")) for r in records] == [("train.step", 1), ("daemon.start", None)]


def test_a_log_without_its_final_newline_gets_one_and_logs_names_the_damage(tmp_path):
    path = tmp_path / "logs" / "daemon.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"ts": "2025-03-01T22:15:07Z", "level": "info", "event": "daemon.start", "run": "night"}\n'
                     b'{"ts": "2025-03-01T22:15:08Z", "level": "info", "eve')
    log = setup_logging(RunDir(tmp_path), "night", console=False)
    log.info("daemon.start", pid=1234)
    close_logging()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["pid"] == 1234  # a line of its own, not glued on

    # Filtered, the torn line cannot match: it is left out, and `logs` says so once.
    out, err = io.StringIO(), io.StringIO()
    assert logs_main(RunDir(tmp_path), event="daemon", as_json=True, out=out, err=err) == 0
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["daemon.start"] * 2
    assert err.getvalue() == (f"skipped 1 damaged line(s) in {path} (not JSON objects: a write cut short by a full "
                              "disk or a power loss; `logs` without filters shows them raw)\n")
    # Unfiltered it is shown raw, and nothing is skipped.
    out, err = io.StringIO(), io.StringIO()
    logs_main(RunDir(tmp_path), as_json=True, out=out, err=err)
    assert len(out.getvalue().splitlines()) == 3 and err.getvalue() == ""


def test_following_with_a_filter_names_a_damaged_line_as_it_arrives(tmp_path):
    path = tmp_path / "logs" / "daemon.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"ts": "2025-03-01T22:15:07Z", "level": "info", "event": "daemon.start", "run": "r"})
                    + "\n")
    calls = []

    def stop() -> bool:  # after the first poll, a torn line glued to a whole one arrives
        calls.append(1)
        if len(calls) == 1:
            with open(path, "ab") as fh:
                fh.write(b'{"ts": "2025-03-01T22:15:08Z", "lev{"event": "daemon.start"}\n')
        return len(calls) > 1

    out, err = io.StringIO(), io.StringIO()
    assert logs_main(RunDir(tmp_path), follow=True, event="daemon", as_json=True, out=out, err=err, stop=stop,
                     sleep=lambda _s: None) == 0
    assert len(out.getvalue().splitlines()) == 1
    assert err.getvalue().startswith(f"skipped 1 damaged line(s) in {path} ")
