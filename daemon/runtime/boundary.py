"""The overnight runtime around the training loop: what happens at every step boundary.

Given the flags raised by signals, the control file and the config watcher, plus the
budget, window, memory and power readings, `Runtime.boundary()` decides whether training
goes on, pauses in-process (after a checkpoint) or stops (after a checkpoint, exit 0).
The loop in `run.py` calls it between steps and stays readable top to bottom.

In a distributed job every rank runs a Runtime and calls `boundary()` at the same step;
each look at the world (once per boundary, once per poll while paused) ends with one
collective that merges every rank's wishes: any rank's stop stops all, any rank's wait
(its own memory or battery) holds all. Only rank 0 has the budget, the window, the
control file and config reloads; the others bring their signals, memory and power.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from mathlora_daemon.config import FINGERPRINT_KEYS, Config
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime import control, memory, power, schedule
from mathlora_daemon.runtime.budget import AwakeClock, Budget
from mathlora_daemon.runtime.signals import Flags
from mathlora_daemon.runtime.world import SINGLE, World, gather_ints

POLL_S = 5.0  # how often a pause re-reads battery and memory
# While training, the guards read the machine at most this often (a 135M model takes
# tens of steps a second; a battery read can cost a millisecond). A pause reads every poll.
MEMORY_EVERY_S = 1.0
POWER_EVERY_S = 10.0
CONTROL_EVERY_S = 1.0  # re-read the control file (a missed file event, a deleted state/)

# What a rank tells the others at a boundary: a stop code and a bit set of waits.
STOP_CODES = {"stopped": 1, "budget_exhausted": 2, "outside_window": 3, "finished": 4}
STOP_TEXT = {1: "asked to stop (signal or `mathlora-daemon stop`)", 2: "the training budget is spent",
             3: "outside the training window", 4: "training is done (early stop)"}
WAIT_USER, WAIT_MEMORY, WAIT_POWER = 1, 2, 4
WAIT_TEXT = {WAIT_USER: ("paused", "paused by the user"), WAIT_MEMORY: ("waiting", "memory is low"),
             WAIT_POWER: ("waiting", "on battery power (pause_on_battery)")}


NOT_NOW = ("only budget, window, segment, retention, power and memory settings change while training; "
           "this applies at the next start")
MODEL_PATH_NOT_NOW = (NOT_NOW + ", if the new path holds the same base model (the base model is part of this "
                      "run's fingerprint)")
FINGERPRINTED = ("part of this run's fingerprint: it cannot change within this run; revert it, or train a new run "
                 "(a new --run-dir, or move checkpoints/ away)")


def _rejection_reasons(rejected: list[str]) -> list[tuple[list[str], str]]:
    """Given the changed keys a running daemon cannot apply, return (keys, why) groups:
    fingerprinted keys (config.FINGERPRINT_KEYS), which no restart of this run accepts,
    and the rest, which apply at the next start (model.path only to the same model)."""
    groups = {FINGERPRINTED: [k for k in rejected if k in FINGERPRINT_KEYS],
              MODEL_PATH_NOT_NOW: [k for k in rejected if k == "model.path"],
              NOT_NOW: [k for k in rejected if k not in FINGERPRINT_KEYS and k != "model.path"]}
    return [(keys, why) for why, keys in groups.items() if keys]


@dataclass
class Stop:
    """Why training ends now: the status state and the reason, for logs and status."""

    state: str  # stopped | budget_exhausted
    reason: str
    event: str | None = None  # the log event that announces it, when there is one


@dataclass
class Runtime:
    run: RunDir
    cfg: Config
    config_path: Path | None
    overrides: list[str]
    log: object
    flags: Flags
    heartbeat: object
    budget: Budget
    clock: AwakeClock = field(default_factory=AwakeClock)
    read_memory: Callable[[], memory.MemoryReading] = memory.read_memory
    read_power: Callable[[], power.PowerState] = power.read_power
    now: Callable[[], datetime] = datetime.now
    user_paused: bool = False
    mem_guard: memory.MemoryGuard = None
    power_watch: power.PowerWatch = field(default_factory=power.PowerWatch)
    last_memory: memory.MemoryReading | None = None
    on_config_change: Callable[[Config, Config], None] | None = None  # (the config before, the reloaded one)
    take_control: Callable[[], list] = list  # FileWatcher.take_control: [(request, rejection reason)]
    poll_control: Callable[[], None] | None = None  # FileWatcher.poll
    # train.method = "sft+grpo" (training/stages.py): a reloaded file is seen as the stage
    # trains it (its method, budget share), so a reload neither ends the SFT stage's share
    # nor reports the stage's own settings as the user's changes.
    view: Callable[[Config], Config] | None = None
    budget_total: Callable[[Config], float] | None = None
    world: World = SINGLE
    gather: Callable[[World, list[int]], list[list[int]]] = gather_ints  # the collective (injected by tests)
    wait_bits: int = 0  # what the last pause_reasons() found, as WAIT_* bits
    finished_early: str | None = None  # why training ends before its last step (early stopping)
    uncharged_s: float = 0.0  # set-up time (compiling) inside the current interval, not charged
    _read_at: dict = field(default_factory=dict)  # reading -> monotonic time it was last taken
    _power: power.PowerState | None = None

    def __post_init__(self):
        self.window = schedule.parse_window(self.cfg.daemon.window)
        if self.mem_guard is None:
            self.mem_guard = memory.MemoryGuard(self.thresholds())

    # -- configuration -------------------------------------------------------------
    def thresholds(self) -> memory.MemoryThresholds:
        d = self.cfg.daemon
        return memory.MemoryThresholds(warning_available_gb=d.memory_warning_available_gb,
                                       critical_available_gb=d.memory_critical_available_gb)

    def apply_reload(self) -> None:
        """Re-read mathlora.toml (file change or SIGHUP): apply the safe fields, log the rest."""
        if not self.flags.reload.is_set():
            return
        self.flags.reload.clear()
        if self.config_path is None:
            return
        new, applied, rejected, error = control.reload_config(self.config_path, self.overrides, self.cfg, self.view)
        if error:
            self.log.warning("config.rejected", why=error)
            return
        # Tell the truth per key: a fingerprinted key never applies to this run (a restart
        # with it refuses the checkpoints, exit 78); the others take effect at the next start.
        for fields, why in _rejection_reasons(rejected):
            self.log.warning("config.rejected", fields=fields, why=why)
        if applied:
            old, self.cfg = self.cfg, new
            self.window = schedule.parse_window(new.daemon.window)
            self.budget.total_s = self.budget_total(new) if self.budget_total else new.daemon.budget_hours * 3600
            self.mem_guard.thresholds = self.thresholds()
            self.heartbeat.update(budget_total_s=self.budget.total_s, window=new.daemon.window)
            self.log.info("config.reloaded", changes=applied)
            if self.on_config_change:
                self.on_config_change(old, new)

    def apply_control(self) -> None:
        """Act on new pause/resume/stop requests from the CLI (each delivered once)."""
        if not self.flags.control.is_set():
            return
        self.flags.control.clear()
        self.flags.halt_requested = None
        for request, why in self.take_control():
            if request is None:
                self.log.warning("control.rejected", why=why)
                continue
            command = request["command"]
            self.log.info(f"control.{command}", id=request["id"], requested_by=request.get("pid"))
            if command == "stop":
                self.flags.request_stop("stopped by the user")
            else:
                self.user_paused = command == "pause"

    # -- the boundary --------------------------------------------------------------
    def finish_early(self, reason: str) -> None:
        """Ask training to end at the next boundary as finished (early stopping)."""
        self.finished_early = reason

    def stop_reason(self) -> Stop | None:
        if self.finished_early:
            return Stop("finished", self.finished_early, "train.early_stop")
        if self.flags.stop.is_set():
            return Stop("stopped", self.flags.stop_reason or "stop requested")
        if self.budget.exhausted:
            return Stop("budget_exhausted", f"training budget of {self.budget.total_s / 3600:g} h is spent",
                        "budget.exhausted")
        if not schedule.inside(self.window, self.now()):
            return Stop("stopped", f"outside the training window {self.cfg.daemon.window}", "schedule.outside_window")
        return None

    def _due(self, name: str, every_s: float, fresh: bool) -> bool:
        """Whether reading `name` is due: always when `fresh`, else once `every_s` passed."""
        now = self.clock.monotonic()
        if fresh or name not in self._read_at or now - self._read_at[name] >= every_s:
            self._read_at[name] = now
            return True
        return False

    def pause_reasons(self, fresh: bool = True) -> list[tuple[str, str]]:
        """Return (status state, reason) for everything that asks training to wait now.
        Without `fresh`, memory and battery are re-read only when their interval is due
        (MEMORY_EVERY_S, POWER_EVERY_S) and the last readings are judged again."""
        reasons, self.wait_bits = [], 0
        if self.user_paused:
            self.wait_bits |= WAIT_USER
            reasons.append(("paused", "paused by the user; `mathlora-daemon resume` continues"))
        if self.last_memory is None or self._due("memory", MEMORY_EVERY_S, fresh):
            self.last_memory = self.read_memory()
            for event, fields in self.mem_guard.check(self.last_memory):
                getattr(self.log, "warning" if event != "memory.recovered" else "info")(event, **fields)
            if self.mem_guard.should_clear_cache:
                import mlx.core as mx

                mx.clear_cache()
        reading = self.last_memory
        if memory.classify(reading, self.mem_guard.thresholds) == "critical":
            self.wait_bits |= WAIT_MEMORY
            reasons.append(("waiting", f"memory is low: {reading.sys_available_gb:.2f} GB available, below "
                                       f"{self.cfg.daemon.memory_critical_available_gb:g} GB"))
        if self._power is None or self._due("power", POWER_EVERY_S, fresh):
            self._power = self.read_power()
            for event, fields in self.power_watch.check(self._power):
                self.log.info(event, **fields)
        state = self._power
        if self.power_watch.should_pause(self.cfg.daemon.pause_on_battery, state):
            self.wait_bits |= WAIT_POWER
            reasons.append(("waiting", "on battery power (pause_on_battery)"))
        return reasons

    def account(self, training: bool) -> None:
        """Close the interval since the last call: awake time counts against the budget
        when it was spent training, less any set-up time noted in it (not_training); a
        system sleep is logged and never counted."""
        awake, slept = self.clock.tick()
        if slept:
            self.log.info("system.slept", seconds=round(slept, 1))
        setup = min(self.uncharged_s, awake)
        self.uncharged_s -= setup
        if training:
            self.budget.add(awake - setup)

    def not_training(self, seconds: float) -> None:
        """Note that `seconds` of the current interval were set-up (building compiled
        traces), which the budget does not count, like loading the model."""
        self.uncharged_s += max(0.0, seconds)

    def _refresh(self, training: bool) -> Stop | None:
        """Account the time since the last call, take in reloads and control requests,
        and return a Stop when one is due."""
        self.account(training=training)
        self.apply_reload()
        if self.poll_control is not None and self._due("control", CONTROL_EVERY_S, fresh=not training):
            self.poll_control()
        self.apply_control()
        return self.stop_reason()

    def _look(self, training: bool) -> tuple[Stop | None, list[tuple[str, str]]]:
        """Return (stop, pause reasons) now, merged across all ranks. Between training
        steps the machine is read at its intervals; while waiting, at every poll."""
        stop = self._refresh(training=training)
        reasons = [] if stop else self.pause_reasons(fresh=not training)
        return self.merge_ranks(stop, reasons)

    def merge_ranks(self, stop: Stop | None, reasons: list) -> tuple[Stop | None, list[tuple[str, str]]]:
        """Given this rank's stop and pause reasons, return the job's: one collective in
        which every rank shares a stop code and its wait bits (a no-op in one process).
        Every rank gets the same answer to "stop?" and "wait?"; the texts stay local."""
        if not self.world.distributed:
            return stop, reasons
        code = 0
        if stop:
            code = STOP_CODES["outside_window"] if stop.event == "schedule.outside_window" else STOP_CODES[stop.state]
        rows = self.gather(self.world, [code, 0 if stop else self.wait_bits])
        if stop:
            return stop, []
        asked = [(rank, row[0]) for rank, row in enumerate(rows) if row[0]]
        if asked:
            rank, code = asked[0]
            state = {STOP_CODES["budget_exhausted"]: "budget_exhausted", STOP_CODES["finished"]: "finished"}.get(
                code, "stopped")
            return Stop(state, f"rank {rank}: {STOP_TEXT[code]}"), []
        merged = list(reasons)
        for rank, (_, bits) in enumerate(rows):
            if rank == self.world.rank:
                continue
            merged += [(state, f"rank {rank}: {text}") for bit, (state, text) in WAIT_TEXT.items() if bits & bit]
        return None, merged

    def boundary(self, checkpoint: Callable[[], None]) -> Stop | None:
        """At an optimizer-step boundary: return a Stop when training must end now;
        otherwise return None, after waiting in-process (checkpoint first) for as long
        as anything asks training to pause (on any rank)."""
        stop, reasons = self._look(training=True)
        if stop:
            return stop
        if not reasons:
            return None
        checkpoint()
        self.account(training=True)  # the checkpoint was training time
        announced = None
        while reasons:
            state, why = reasons[0]
            if (state, why) != announced:
                self.log.info("daemon.paused", state=state, reason=why)
                self.heartbeat.update(state=state, phase=state, reason=why)
                try:
                    self.heartbeat.write()
                except OSError:
                    pass  # the heartbeat thread retries
                announced = (state, why)
            self.flags.wake.wait(POLL_S)
            self.flags.wake.clear()
            stop, reasons = self._look(training=False)
            if stop:
                return stop
        self.log.info("daemon.resumed", after=announced[1] if announced else None)
        self.heartbeat.update(state="running", phase="training", reason=None)
        return None

    def window_ends(self) -> datetime | None:
        return schedule.window_end(self.window, self.now())
