"""The step-boundary decisions of `daemon.runtime.Runtime`, with controlled inputs.

The real Runtime code runs here with an injected battery reader, memory reader and
clocks, so power and budget behaviour can be driven exactly (the end-to-end tests in
test_daemon.py cover the same loop through real processes).
"""

from __future__ import annotations

import threading
from datetime import datetime

from mathlora_daemon.config import Config
from mathlora_daemon.runtime.boundary import Runtime
from mathlora_daemon.runtime.budget import AwakeClock, Budget
from mathlora_daemon.runtime.memory import MemoryReading
from mathlora_daemon.runtime.power import PowerState
from mathlora_daemon.runtime.signals import Flags

from fakes import FakeClock, RecordingHeartbeat, RecordingLog

PLENTY = MemoryReading(mem_active_gb=0.1, mem_cache_gb=0.0, mem_peak_gb=0.1, rss_gb=0.2, sys_available_gb=20.0,
                       swap_used_gb=0.0)


def make_runtime(power: list[PowerState], clock: FakeClock | None = None, **daemon) -> tuple[Runtime, RecordingLog]:
    cfg = Config()
    for key, value in daemon.items():
        setattr(cfg.daemon, key, value)
    clock = clock or FakeClock()
    log = RecordingLog()
    runtime = Runtime(run=None, cfg=cfg, config_path=None, overrides=[], log=log, flags=Flags(),
                      heartbeat=RecordingHeartbeat(), budget=Budget(cfg.daemon.budget_hours * 3600),
                      clock=AwakeClock(monotonic=lambda: clock.mono, wall=lambda: clock.wall),
                      read_memory=lambda: PLENTY, read_power=lambda: power[-1],
                      now=lambda: datetime(2026, 11, 24, 23, 0))
    return runtime, log


def test_on_battery_it_checkpoints_waits_and_resumes_when_plugged_in():
    power = [PowerState(on_battery=True, percent=80.0)]
    runtime, log = make_runtime(power, pause_on_battery=True)
    checkpoints = []
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("stop", runtime.boundary(
        lambda: checkpoints.append("saved"))))
    worker.start()
    log.wait_for("daemon.paused")
    assert checkpoints == ["saved"]  # the checkpoint comes before the wait
    assert runtime.heartbeat.fields["state"] == "waiting"
    assert "battery" in runtime.heartbeat.fields["reason"]
    assert worker.is_alive()  # still waiting in-process, not exited

    power.append(PowerState(on_battery=False, percent=81.0))
    runtime.flags.wake.set()
    worker.join(timeout=30)
    assert not worker.is_alive() and result["stop"] is None  # training goes on
    assert log.names() == ["power.on_battery", "daemon.paused", "power.plugged_in", "daemon.resumed"]
    assert runtime.heartbeat.fields["state"] == "running"


def test_on_battery_without_pause_on_battery_only_logs():
    runtime, log = make_runtime([PowerState(on_battery=True, percent=50.0)], pause_on_battery=False)
    calls = []
    assert runtime.boundary(lambda: calls.append(1)) is None
    assert calls == [] and log.names() == ["power.on_battery"]


def test_a_stop_while_waiting_on_battery_ends_training():
    runtime, log = make_runtime([PowerState(on_battery=True, percent=10.0)], pause_on_battery=True)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("stop", runtime.boundary(lambda: None)))
    worker.start()
    log.wait_for("daemon.paused")
    runtime.flags.request_stop("signal SIGTERM")
    worker.join(timeout=30)
    assert result["stop"].state == "stopped" and result["stop"].reason == "signal SIGTERM"


def test_only_awake_training_time_counts_and_a_system_sleep_is_logged():
    clock = FakeClock()
    runtime, log = make_runtime([PowerState(on_battery=None, percent=None)], clock=clock, budget_hours=1.0)
    runtime.account(training=False)
    clock.awake(100)  # a training step
    assert runtime.boundary(lambda: None) is None
    clock.awake(50)
    clock.sleep_system(3600)  # the lid closed for an hour mid-step
    assert runtime.boundary(lambda: None) is None
    assert runtime.budget.used_s == 150
    slept = [f for _, e, f in log.events if e == "system.slept"]
    assert slept == [{"seconds": 3600.0}]
    clock.awake(3450)
    stop = runtime.boundary(lambda: None)
    assert stop.state == "budget_exhausted" and stop.event == "budget.exhausted"


def test_a_rejected_edit_says_per_key_whether_a_restart_can_apply_it(tmp_path):
    from mathlora_daemon.config import to_toml

    runtime, log = make_runtime([PowerState(on_battery=False, percent=100.0)])
    edited = Config()
    edited.train.learning_rate = runtime.cfg.train.learning_rate * 2  # fingerprinted: never within this run
    edited.lora.rank = runtime.cfg.lora.rank * 2                      # fingerprinted too
    edited.train.epochs = runtime.cfg.train.epochs + 1                 # applies at the next start
    edited.model.path = "models/elsewhere"                            # the next start, if the same model
    edited.daemon.budget_hours = 2.0                                   # safe: applied now
    runtime.config_path = tmp_path / "mathlora.toml"
    runtime.config_path.write_text(to_toml(edited))
    runtime.flags.request_reload()

    runtime.apply_reload()

    rejected = [(fields["fields"], fields["why"]) for _, event, fields in log.events if event == "config.rejected"]
    assert [keys for keys, _ in rejected] == [["lora.rank", "train.learning_rate"], ["model.path"], ["train.epochs"]]
    fixed, model_path, later = (why for _, why in rejected)
    assert fixed == ("part of this run's fingerprint: it cannot change within this run; revert it, or train a new "
                     "run (a new --run-dir, or move checkpoints/ away)")
    assert "restart" not in fixed and "next start" not in fixed
    assert later.endswith("applies at the next start")
    assert "next start" in model_path and "same base model" in model_path
    assert runtime.cfg.daemon.budget_hours == 2.0 and runtime.cfg.train.learning_rate != edited.train.learning_rate
    assert [event for _, event, _ in log.events][-1] == "config.reloaded"


def test_pause_on_battery_turned_on_by_a_reload_pauses_at_the_next_boundary(tmp_path):
    """The one reloadable key the end-to-end tests cannot drive (no battery to unplug
    there): on battery, off by config; the file turns it on; the next boundary waits."""
    from mathlora_daemon.config import to_toml

    power = [PowerState(on_battery=True, percent=60.0)]
    runtime, log = make_runtime(power, pause_on_battery=False)
    assert runtime.boundary(lambda: None) is None  # on battery, allowed: training goes on
    edited = Config()
    edited.daemon.pause_on_battery = True
    runtime.config_path = tmp_path / "mathlora.toml"
    runtime.config_path.write_text(to_toml(edited))
    runtime.flags.request_reload()
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("stop", runtime.boundary(lambda: None)))
    worker.start()
    log.wait_for("daemon.paused")
    assert runtime.heartbeat.fields["state"] == "waiting" and "battery" in runtime.heartbeat.fields["reason"]
    power.append(PowerState(on_battery=False, percent=61.0))
    runtime.flags.wake.set()
    worker.join(timeout=30)
    assert not worker.is_alive() and result["stop"] is None
    assert [f["changes"] for _, e, f in log.events if e == "config.reloaded"] == [
        {"daemon.pause_on_battery": [False, True]}]
