"""`logs` as a user sees it: tail, filters, rotation order, raw JSON, and `-f` following
appends and rotations (driven in a thread; every wait is on an event or a deadline)."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from mathlora_daemon.cli.watch import logs_main
from mathlora_daemon.rundir import RunDir

from runs import wait_for

T0 = datetime(2025, 3, 1, 22, 15, 7, tzinfo=timezone.utc).timestamp()


def rec(i: int, event: str = "train.step", level: str = "info", **fields) -> dict:
    ts = datetime.fromtimestamp(T0 + i, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"ts": ts, "level": level, "event": event, "run": "dsmath", "i": i, **fields}


def write_log(path: Path, rows, mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def log_path(run_dir: Path, n: int = 0) -> Path:
    name = "daemon.jsonl" + (f".{n}" if n else "")
    return run_dir / "logs" / name


def run_logs(run_dir: Path, **kwargs) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    rc = logs_main(RunDir(run_dir), out=out, err=err, **kwargs)
    return rc, out.getvalue().splitlines(), err.getvalue()


def ids(lines: list[str]) -> list[int]:
    return [json.loads(line)["i"] for line in lines]


def local_hms(i: int) -> str:
    return datetime.fromtimestamp(T0 + i).strftime("%H:%M:%S")


# --------------------------------------------------------------------------- tail and filters


def test_last_n_lines_oldest_first(tmp_path):
    write_log(log_path(tmp_path), [rec(i) for i in range(30)])
    rc, lines, _ = run_logs(tmp_path, lines=5, as_json=True)
    assert rc == 0
    assert ids(lines) == [25, 26, 27, 28, 29]
    assert len(run_logs(tmp_path)[1]) == 20  # default -n
    assert run_logs(tmp_path, lines=0)[1] == []


def test_human_rendering_local_time_sorted_keys_without_envelope(tmp_path):
    write_log(log_path(tmp_path), [rec(0, "checkpoint.saved", step=12, path="/r/checkpoints/step-00000012",
                                       seconds=1.23456789, why="disk is full", extra={"b": 1, "a": [1, 2]})])
    _, lines, _ = run_logs(tmp_path)
    assert lines == [f"{local_hms(0)} info    checkpoint.saved "
                     'extra={"a":[1,2],"b":1} i=0 path=/r/checkpoints/step-00000012 seconds=1.23457 step=12 '
                     'why="disk is full"']
    assert "dsmath" not in lines[0] and "ts=" not in lines[0]


def test_level_is_a_minimum(tmp_path):
    levels = ["debug", "info", "warning", "error", "critical", "info"]
    write_log(log_path(tmp_path), [rec(i, level=lv) for i, lv in enumerate(levels)])
    assert ids(run_logs(tmp_path, level="warning", as_json=True)[1]) == [2, 3, 4]
    assert ids(run_logs(tmp_path, level="ERROR", as_json=True)[1]) == [3, 4]
    assert ids(run_logs(tmp_path, level="debug", as_json=True)[1]) == [0, 1, 2, 3, 4, 5]
    rc, lines, err = run_logs(tmp_path, level="loud")
    assert rc == 2 and lines == [] and "unknown level 'loud'" in err


def test_event_matches_exactly_or_at_a_dot_boundary(tmp_path):
    events = ["train.step", "training", "checkpoint.saved", "checkpoint.rejected", "train.eval",
              "checkpoint", "checkpointing.x", "train.step"]
    levels = ["info", "info", "info", "warning", "info", "info", "info", "debug"]
    write_log(log_path(tmp_path), [rec(i, e, lv) for i, (e, lv) in enumerate(zip(events, levels))])
    assert ids(run_logs(tmp_path, event="checkpoint", as_json=True)[1]) == [2, 3, 5]
    assert ids(run_logs(tmp_path, event="train", as_json=True)[1]) == [0, 4, 7]
    assert ids(run_logs(tmp_path, event="train.step", as_json=True)[1]) == [0, 7]
    assert ids(run_logs(tmp_path, event="train", level="info", as_json=True)[1]) == [0, 4]
    assert ids(run_logs(tmp_path, event="checkpoint", level="warning", as_json=True)[1]) == [3]
    # -n counts matching lines, not lines read.
    assert ids(run_logs(tmp_path, event="checkpoint", lines=2, as_json=True)[1]) == [3, 5]


def test_rotated_files_are_read_oldest_first(tmp_path):
    write_log(log_path(tmp_path, 2), [rec(i) for i in range(0, 3)])
    write_log(log_path(tmp_path, 1), [rec(i) for i in range(3, 6)])
    write_log(log_path(tmp_path), [rec(i) for i in range(6, 8)])
    assert ids(run_logs(tmp_path, lines=100, as_json=True)[1]) == list(range(8))
    assert ids(run_logs(tmp_path, lines=4, as_json=True)[1]) == [4, 5, 6, 7]
    # A filter reaching back into the oldest file.
    write_log(log_path(tmp_path, 2), [rec(0, "daemon.start")] + [rec(i) for i in range(1, 3)])
    assert ids(run_logs(tmp_path, event="daemon", as_json=True)[1]) == [0]


def test_rotated_files_without_a_current_file_are_still_shown(tmp_path):
    write_log(log_path(tmp_path, 1), [rec(1), rec(2)])
    rc, lines, err = run_logs(tmp_path, as_json=True)
    assert rc == 0 and ids(lines) == [1, 2] and err == ""


def test_long_log_tail_reads_across_blocks(tmp_path):
    rows = [rec(i, note="x" * 500) for i in range(2000)]  # ~1 MB: many 64 KiB blocks
    write_log(log_path(tmp_path), rows)
    assert ids(run_logs(tmp_path, lines=3, as_json=True)[1]) == [1997, 1998, 1999]
    assert ids(run_logs(tmp_path, event="train", lines=300, as_json=True)[1]) == list(range(1700, 2000))


def test_json_mode_passes_lines_through_unchanged(tmp_path):
    raw = ['{"ts": "2025-03-01T22:15:07Z",   "level": "info", "event": "a", "run": "r", "z": 1.50}',
           '{"event":"b","level":"info","ts":"2025-03-01T22:15:08Z","run":"r","u":"\\u00e9"}']
    write_log(log_path(tmp_path), raw)
    assert run_logs(tmp_path, as_json=True)[1] == raw


def test_garbage_lines_are_shown_raw_and_never_crash(tmp_path):
    path = write_log(log_path(tmp_path), [rec(0), "this is not json {", "[1, 2]", rec(1, level="error")])
    with open(path, "ab") as fh:
        fh.write(b"\xff\xfe broken bytes\n\n")
        fh.write((json.dumps(rec(2)) + "\n").encode())
    _, lines, _ = run_logs(tmp_path)
    assert lines[1:3] == ["this is not json {", "[1, 2]"]
    assert "broken bytes" in lines[4]
    assert len(lines) == 6 and lines[3].endswith("error   train.step i=1")
    # A filter cannot match a line without fields.
    assert run_logs(tmp_path, level="error")[1] == [f"{local_hms(1)} error   train.step i=1"]
    # Odd but valid JSON fields do not crash the renderer either.
    write_log(log_path(tmp_path), [{"event": 5, "level": None, "ts": "yesterday"}, {}])
    _, lines, _ = run_logs(tmp_path)
    assert lines == ["yesterday -       5", "--:--:-- -       -"]


def test_no_log_yet(tmp_path):
    rc, lines, err = run_logs(tmp_path / "run")
    assert rc == 0 and lines == []
    assert err == f"no log yet at {tmp_path / 'run' / 'logs' / 'daemon.jsonl'}\n"


# --------------------------------------------------------------------------- follow


class Stepper:
    """An injected sleep that lets the test decide when the follower polls again."""

    def __init__(self) -> None:
        self.polled = threading.Semaphore(0)
        self.go = threading.Semaphore(0)

    def sleep(self, _seconds: float) -> None:
        self.polled.release()
        self.go.acquire(timeout=10)

    def step(self) -> None:
        """Let one more poll run and wait until it has finished."""
        self.go.release()
        assert self.polled.acquire(timeout=5), "the follower did not poll"


class Follow:
    """`logs -f` running in a thread; stop() ends it through the stop callable."""

    def __init__(self, run_dir: Path, stepper: Stepper | None = None, **kwargs):
        self.out, self.err = io.StringIO(), io.StringIO()
        self.stop_flag = threading.Event()
        self.stepper = stepper
        extra = {"sleep": stepper.sleep} if stepper else {"poll_s": 0.005}
        self.result: list[int] = []
        self.thread = threading.Thread(target=lambda: self.result.append(logs_main(
            RunDir(run_dir), follow=True, out=self.out, err=self.err, stop=self.stop_flag.is_set, **extra, **kwargs)))
        self.thread.start()
        if stepper:
            assert stepper.polled.acquire(timeout=5)  # the initial tail and first poll are done

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    def wait_lines(self, count: int, timeout_s: float = 5.0) -> list[str]:
        wait_for(lambda: len(self.lines()) >= count, what=f"{count} lines, got {self.lines()}", timeout_s=timeout_s,
                 interval_s=0.002)
        return self.lines()

    def stop(self) -> int:
        self.stop_flag.set()
        if self.stepper:
            self.stepper.go.release()
        self.thread.join(5)
        assert not self.thread.is_alive()
        return self.result[0]


def test_follow_prints_tail_then_appended_lines(tmp_path):
    path = write_log(log_path(tmp_path), [rec(i) for i in range(5)])
    f = Follow(tmp_path, lines=2, as_json=True)
    try:
        assert ids(f.wait_lines(2)) == [3, 4]
        write_log(path, [rec(5), rec(6, "checkpoint.saved")], mode="a")
        assert ids(f.wait_lines(4)) == [3, 4, 5, 6]
    finally:
        assert f.stop() == 0
    assert ids(f.lines()) == [3, 4, 5, 6]


def test_follow_filters_new_lines_and_waits_for_a_partial_line(tmp_path):
    path = write_log(log_path(tmp_path), [])
    stepper = Stepper()
    f = Follow(tmp_path, stepper, event="checkpoint")
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(rec(1)) + "\n")
            line = json.dumps(rec(2, "checkpoint.saved", step=2))
            fh.write(line[:10])  # the writer is mid-line
        stepper.step()
        assert f.lines() == []
        with open(path, "a") as fh:
            fh.write(line[10:] + "\n")
        stepper.step()
        assert f.lines() == [f"{local_hms(2)} info    checkpoint.saved i=2 step=2"]
    finally:
        f.stop()


def test_follow_survives_rotation_and_drains_the_old_file(tmp_path):
    path = write_log(log_path(tmp_path), [rec(0)])
    stepper = Stepper()
    f = Follow(tmp_path, stepper, as_json=True)
    try:
        assert ids(f.lines()) == [0]
        # Between two polls: a last line into the old file, then rotate, then new lines.
        write_log(path, [rec(1)], mode="a")
        os.rename(path, log_path(tmp_path, 1))
        stepper.step()  # the path is missing for a moment: nothing lost, nothing printed twice
        write_log(path, [rec(2), rec(3)])
        stepper.step()
        assert ids(f.lines()) == [0, 1, 2, 3]
        # Truncated in place (copytruncate-style) and rewritten shorter.
        path.write_text(json.dumps(rec(4)) + "\n")
        stepper.step()
        assert ids(f.lines()) == [0, 1, 2, 3, 4]
    finally:
        f.stop()


def test_follow_waits_for_a_log_that_does_not_exist_yet(tmp_path):
    f = Follow(tmp_path)
    try:
        wait_for(lambda: "no log yet" in f.err.getvalue(), what="the 'no log yet' notice", timeout_s=5,
                 interval_s=0.002)
        write_log(log_path(tmp_path), [rec(7, "daemon.start")])
        assert f.wait_lines(1) == [f"{local_hms(7)} info    daemon.start i=7"]
    finally:
        assert f.stop() == 0


def test_follow_sees_every_line_through_real_rotating_file_handler(tmp_path):
    path = log_path(tmp_path)
    path.parent.mkdir(parents=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=400, backupCount=5, encoding="utf-8")
    logger = logging.getLogger("test_logview.rotation")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    f = Follow(tmp_path, as_json=True)
    try:
        for i in range(20):  # ~150 bytes a line: rotates every few lines
            logger.info(json.dumps(rec(i)))
            f.wait_lines(i + 1)  # one line at a time, like a daemon between polls
        assert log_path(tmp_path, 3).exists()  # it really rotated, several times
    finally:
        logger.removeHandler(handler)
        handler.close()
        f.stop()
    assert ids(f.lines()) == list(range(20))
    # And afterwards, the plain tail across the rotated files is in order too.
    tail = ids(run_logs(tmp_path, lines=100, as_json=True)[1])
    assert len(tail) >= 10 and tail == list(range(20 - len(tail), 20))


def test_keyboard_interrupt_ends_follow_cleanly(tmp_path):
    write_log(log_path(tmp_path), [rec(0)])

    def interrupt(_seconds):
        raise KeyboardInterrupt

    out = io.StringIO()
    assert logs_main(RunDir(tmp_path), follow=True, as_json=True, out=out, sleep=interrupt) == 0
    assert ids(out.getvalue().splitlines()) == [0]
