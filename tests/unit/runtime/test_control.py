"""Control requests, the file watcher (real watchdog observer) and config hot reload."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mathlora_checkpoints.fsio import atomic_write_text
from mathlora_daemon.config import load_config
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.control import (
    COMMANDS,
    SAFE_FIELDS,
    FileWatcher,
    is_safe_field,
    read_ack,
    read_request,
    reload_config,
    send_request,
    write_request,
)

from runs import ROOT

DEADLINE_S = 10.0


def test_write_read_round_trip_and_modes(tmp_path):
    for command in COMMANDS:
        request = write_request(RunDir(tmp_path), command)
        assert read_request(RunDir(tmp_path)) == (request, None)
        assert request["command"] == command and len(request["id"]) == 32
        assert request["pid"] == os.getpid() and request["at"].endswith("+00:00")
    assert stat.S_IMODE(os.stat(RunDir(tmp_path).control_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["control.json"]  # no temp leftovers


def test_ids_are_unique(tmp_path):
    assert write_request(RunDir(tmp_path), "pause")["id"] != write_request(RunDir(tmp_path), "pause")["id"]


def test_no_control_file_is_not_a_rejection(tmp_path):
    assert read_request(RunDir(tmp_path)) == (None, None)


def test_write_request_rejects_unknown_command(tmp_path):
    with pytest.raises(InputError) as info:
        write_request(RunDir(tmp_path), "reboot")
    message = str(info.value)
    assert "'reboot'" in message and "pause, resume, stop" in message
    assert not RunDir(tmp_path).control_file.exists()


GOOD = {"command": "stop", "id": "a" * 32, "at": "2025-01-01T00:00:00+00:00", "pid": 1}


@pytest.mark.parametrize("content, why", [
    (json.dumps({**GOOD, "command": "rm -rf"}), "unknown control command"),
    ("{not json", "not valid JSON"),
    ("\xff\xfe", "not valid JSON"),
    (json.dumps(["stop"]), "JSON object"),
    (json.dumps({"command": "stop"}), "lacks id"),
    (json.dumps({**GOOD, "shell": "x"}), "unknown keys shell"),
    (json.dumps({**GOOD, "id": ""}), "id"),
    (json.dumps({**GOOD, "id": 7}), "id"),
    (json.dumps({**GOOD, "pid": "1"}), "'pid'"),
    (json.dumps({**GOOD, "pid": True}), "'pid'"),
    (json.dumps({**GOOD, "at": 5}), "'at'"),
    ("x" * 70000, "bytes"),
])
def test_read_request_rejects_bad_files(tmp_path, content, why):
    path = RunDir(tmp_path).control_file
    path.parent.mkdir()
    path.write_text(content, encoding="latin-1")
    request, reason = read_request(RunDir(tmp_path))
    assert request is None and why in reason


def test_hand_written_minimal_request_is_accepted(tmp_path):
    path = RunDir(tmp_path).control_file
    path.parent.mkdir()
    path.write_text(json.dumps({"command": "pause", "id": "by-hand-1"}))
    assert read_request(RunDir(tmp_path)) == ({"command": "pause", "id": "by-hand-1"}, None)


class Recorder:
    """Callbacks for the watcher that only set events, as the daemon's do."""

    def __init__(self) -> None:
        self.commands: list = []
        self.control = threading.Event()
        self.config = threading.Event()
        self.config_calls = 0

    def on_control(self, command: str | None = None) -> None:
        self.commands.append(command)
        self.control.set()

    def on_config(self) -> None:
        self.config_calls += 1
        self.config.set()


def wait_for_requests(watcher: FileWatcher, rec: Recorder, count: int) -> list:
    """Collect deliveries until `count` arrived or the deadline passed."""
    got: list = []
    while len(got) < count:
        if not rec.control.wait(DEADLINE_S):
            break
        rec.control.clear()
        got += watcher.take_control()
    return got


@pytest.fixture
def watched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = run_dir / "mathlora.toml"
    config.write_text("[daemon]\nbudget_hours = 16.0\n")
    rec = Recorder()
    watcher = FileWatcher(RunDir(run_dir), config, rec.on_control, rec.on_config)
    yield run_dir, config, rec, watcher
    watcher.stop()


def test_watcher_delivers_each_request_id_once(watched):
    run_dir, _, rec, watcher = watched
    watcher.prime()
    watcher.start()
    first = write_request(RunDir(run_dir), "pause")
    assert wait_for_requests(watcher, rec, 1) == [(first, None)]

    # The same request written again (same id) must not be delivered a second time.
    # The next, new request is the barrier: the observer handles events in order, so
    # once it arrives every event of the rewrite has been handled.
    atomic_write_text(RunDir(run_dir).control_file, json.dumps(first))
    second = write_request(RunDir(run_dir), "resume")
    assert wait_for_requests(watcher, rec, 1) == [(second, None)]
    assert watcher.take_control() == []


def test_watcher_delivers_rejections_once(watched):
    run_dir, _, rec, watcher = watched
    watcher.prime()
    watcher.start()
    path = RunDir(run_dir).control_file
    atomic_write_text(path, json.dumps({"command": "format-disk", "id": "x1"}))
    (got,) = wait_for_requests(watcher, rec, 1)
    assert got[0] is None and "format-disk" in got[1]

    os.utime(path)  # a touch: same content, not rejected (logged) again
    request = write_request(RunDir(run_dir), "stop")
    assert wait_for_requests(watcher, rec, 1) == [(request, None)]


def test_prime_suppresses_old_request(watched):
    run_dir, _, rec, watcher = watched
    old = write_request(RunDir(run_dir), "stop")  # left over from before the daemon started
    assert watcher.prime() == old
    watcher.start()
    atomic_write_text(RunDir(run_dir).control_file, json.dumps(old))  # an event for the old request
    new = write_request(RunDir(run_dir), "pause")
    assert wait_for_requests(watcher, rec, 1) == [(new, None)]


def test_watcher_sees_request_from_the_cli_process(watched):
    """The real path: another process (the CLI) writes the request."""
    run_dir, _, rec, watcher = watched
    watcher.prime()
    watcher.start()
    root = ROOT
    code = ("from mathlora_daemon.rundir import RunDir; from mathlora_daemon.runtime.control import write_request; "
            f"write_request(RunDir({str(run_dir)!r}), 'stop')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": str(root)})
    ((request, reason),) = wait_for_requests(watcher, rec, 1)
    assert reason is None and request["command"] == "stop" and request["pid"] != os.getpid()


def test_watcher_reports_config_edits(watched):
    run_dir, config, rec, watcher = watched
    watcher.prime()
    watcher.start()
    config.write_text("[daemon]\nbudget_hours = 2.0\n")  # edited in place, like most editors
    assert rec.config.wait(DEADLINE_S)
    rec.config.clear()
    atomic_write_text(config, "[daemon]\nbudget_hours = 3.0\n")  # replaced atomically
    assert rec.config.wait(DEADLINE_S)
    assert not rec.control.is_set()  # config events are not control events


def test_watcher_ignores_config_touch_and_neighbours(watched):
    run_dir, config, rec, watcher = watched
    watcher.prime()
    watcher.start()
    os.utime(config)  # a touch: same content
    (run_dir / "other.toml").write_text("x = 1\n")  # a neighbour is not the config
    # Barrier in the same directory (one watch, events in order): a real edit.
    atomic_write_text(config, "[daemon]\nbudget_hours = 5.0\n")
    assert rec.config.wait(DEADLINE_S)
    assert rec.config_calls == 1


def test_watcher_stop_is_idempotent(watched):
    _, _, _, watcher = watched
    watcher.start()
    watcher.stop()
    watcher.stop()
    assert watcher.observer is None


def test_safe_fields():
    for name in ("daemon.budget_hours", "daemon.window", "daemon.segment_minutes", "daemon.keep_checkpoints",
                 "daemon.checkpoint_every_steps", "daemon.prevent_sleep", "daemon.pause_on_battery"):
        assert name in SAFE_FIELDS and is_safe_field(name)
    assert is_safe_field("daemon.memory_warning_available_gb") and is_safe_field("daemon.memory_limit_gb")
    # Only a declaration makes a key reloadable: no name pattern promises it for keys
    # read at start (the memory plan, the crash guard's count).
    assert not is_safe_field("daemon.memory_plan") and not is_safe_field("daemon.max_crash_restarts")
    assert not is_safe_field("daemon.memory_some_future_key")
    for name in ("lora.rank", "model.name", "data.max_seq_len", "train.learning_rate", "train.seed"):
        assert not is_safe_field(name)


def write_config(path: Path, budget=16.0, rank=8, segment=10.0) -> None:
    path.write_text(f"[lora]\nrank = {rank}\n[daemon]\nbudget_hours = {budget}\nsegment_minutes = {segment}\n")


def test_reload_applies_safe_changes_and_rejects_unsafe(tmp_path):
    path = tmp_path / "mathlora.toml"
    write_config(path)
    overrides = ["train.learning_rate=2e-4"]
    current = load_config(path, overrides)

    write_config(path, budget=2.0, rank=16, segment=5.0)
    new, applied, rejected, error = reload_config(path, overrides, current)
    assert error is None
    assert applied == {"daemon.budget_hours": [16.0, 2.0], "daemon.segment_minutes": [10.0, 5.0]}
    assert rejected == ["lora.rank"]
    assert new.daemon.budget_hours == 2.0 and new.daemon.segment_minutes == 5.0
    assert new.lora.rank == 8  # unsafe: not applied
    assert new.train.learning_rate == 2e-4  # the overrides still hold
    assert current.daemon.budget_hours == 16.0  # the caller's config is untouched
    assert new is not current and new.lora.targets is not current.lora.targets

    # Nothing changed: nothing to apply or reject.
    assert reload_config(path, overrides, new)[1:] == ({}, ["lora.rank"], None)
    write_config(path, budget=2.0, rank=8, segment=5.0)
    assert reload_config(path, overrides, new)[1:] == ({}, [], None)


def test_reload_returns_error_for_malformed_or_missing_file(tmp_path):
    path = tmp_path / "mathlora.toml"
    write_config(path)
    current = load_config(path)

    path.write_text("[daemon\nbudget_hours = 2.0\n")
    new, applied, rejected, error = reload_config(path, [], current)
    assert new is current and applied == {} and rejected == [] and "not valid TOML" in error

    path.write_text("[daemon]\nbudget_hours = -1.0\n")
    new, applied, rejected, error = reload_config(path, [], current)
    assert new is current and applied == {} and "daemon.budget_hours" in error

    path.write_text("  \n")  # an editor truncated it and has not written yet
    new, applied, rejected, error = reload_config(path, [], current)
    assert new is current and applied == {} and "empty" in error

    path.unlink()
    new, applied, rejected, error = reload_config(path, [], current)
    assert new is current and applied == {} and "missing" in error


# --- addressed, acknowledged requests (no request lost) -------------------------------------

class _ContentionLock:
    """A lock that tells when a second thread has to wait for it (no timing involved)."""

    def __init__(self, contended: threading.Event) -> None:
        self._lock, self.contended = threading.Lock(), contended

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def test_a_stale_read_never_delivers_an_older_request_again(watched, monkeypatch):
    """The race the thousand-request test found: watchdog's thread reads request A, and
    before it acts, the main loop's poll delivers A, the CLI writes B and a poll delivers
    B. The stale A must not then be delivered (and acknowledged) a second time."""
    from mathlora_daemon.runtime import control

    run_dir, _, rec, watcher = watched
    run, pid = RunDir(run_dir), os.getpid()
    progress = threading.Event()  # the main loop's polls finished, or had to wait for the lock
    watcher._lock = _ContentionLock(progress)
    first = write_request(run, "pause", to_pid=pid)
    real_read, stalled = control.read_request, threading.current_thread()

    def main_loop():
        watcher.poll()
        write_request(run, "resume", to_pid=pid)
        watcher.poll()
        progress.set()

    other = threading.Thread(target=main_loop)

    def read_then_stall(run_):
        got = real_read(run_)
        if threading.current_thread() is stalled and not other.is_alive() and not progress.is_set():
            other.start()  # the main loop runs while this read is still in hand
            progress.wait(DEADLINE_S)
        return got

    monkeypatch.setattr(control, "read_request", read_then_stall)
    watcher._control_changed()  # watchdog's thread, with A read
    other.join(DEADLINE_S)
    assert not other.is_alive()
    delivered = [request["id"] for request, _ in watcher.take_control()]
    assert delivered == [first["id"], read_ack(run)["id"]] and rec.commands == ["pause", "resume"]


def test_prime_delivers_a_request_addressed_to_this_daemon_and_acknowledges_it(watched):
    """A `stop` written between the daemon's lock and its watcher is this daemon's: it is
    delivered, not taken for a stale one (the lost-stop race at start-up)."""
    run_dir, _, rec, watcher = watched
    request = write_request(RunDir(run_dir), "stop", to_pid=os.getpid())
    watcher.prime()
    assert watcher.take_control() == [(request, None)]
    assert rec.commands == ["stop"]
    ack = read_ack(RunDir(run_dir))
    assert ack["id"] == request["id"] and ack["pid"] == os.getpid() and ack["command"] == "stop"


def test_prime_ignores_a_request_for_an_earlier_daemon(watched):
    run_dir, _, rec, watcher = watched
    write_request(RunDir(run_dir), "stop", to_pid=os.getpid() + 1)  # the previous daemon's
    watcher.prime()
    watcher.start()
    assert watcher.take_control() == [] and read_ack(RunDir(run_dir)) is None
    mine = write_request(RunDir(run_dir), "pause", to_pid=os.getpid())
    assert wait_for_requests(watcher, rec, 1) == [(mine, None)]


def test_poll_recovers_a_deleted_state_directory(watched):
    """`rm -rf RUN/state` while running: the next poll re-creates and re-watches it, and
    requests written afterwards arrive through the watcher again."""
    import shutil

    run_dir, _, rec, watcher = watched
    watcher.prime()
    watcher.start()
    shutil.rmtree(run_dir / "state")
    first = write_request(RunDir(run_dir), "pause", to_pid=os.getpid())  # the CLI re-creates state/
    watcher.poll()  # a boundary: re-watch, and deliver what the dead watch missed
    assert watcher.take_control() == [(first, None)]
    second = write_request(RunDir(run_dir), "resume", to_pid=os.getpid())
    assert wait_for_requests(watcher, rec, 1) == [(second, None)]


def test_send_request_waits_for_the_acknowledgement(watched):
    run_dir, _, rec, watcher = watched
    watcher.prime()
    watcher.start()
    outcome, request, pid = send_request(RunDir(run_dir), "stop", probe=lambda _d: (True, os.getpid()))
    assert outcome == "accepted" and pid == os.getpid() and read_ack(RunDir(run_dir))["id"] == request["id"]


def test_send_request_without_an_answer_says_so():
    """A daemon that never reads the file (SIGSTOPped): not "accepted"."""
    import tempfile

    clock = iter(range(0, 100)).__next__
    with tempfile.TemporaryDirectory() as run_dir:
        outcome, request, pid = send_request(RunDir(Path(run_dir)), "pause", probe=lambda _d: (True, 4242),
                                             timeout_s=5, clock=clock, pause=lambda _s: None)
        assert outcome == "unacknowledged" and pid == 4242
        assert read_request(RunDir(Path(run_dir)))[0]["to_pid"] == 4242  # it stays for the daemon
        outcome, _, _ = send_request(RunDir(Path(run_dir)), "stop", probe=lambda _d: (False, None))
        assert outcome == "no_daemon"


def test_send_request_readdresses_a_restarted_daemon(tmp_path):
    holders = iter([(True, 100), (True, 200), (True, 200)])
    seen = []

    def probe(_d):
        holder = next(holders, (True, 200))
        request = read_request(RunDir(tmp_path))[0]
        if request and request.get("to_pid") == 200 and not seen:
            seen.append(request)  # the new daemon acknowledges the re-addressed request
            atomic_write_text(tmp_path / "state" / "control-ack.json",
                              json.dumps({"id": request["id"], "command": "stop", "pid": 200}))
        return holder

    outcome, request, pid = send_request(RunDir(tmp_path), "stop", probe=probe, pause=lambda _s: None)
    assert outcome == "accepted" and pid == 200 and seen[0]["id"] == request["id"]
