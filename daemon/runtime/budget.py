"""The training-time budget across restarts: awake time only, with sleep detection.

Holds ``AwakeClock`` (awake seconds and slept seconds between ticks), ``Budget`` (total,
used, left), ``initial_used`` (where a new start's count begins) and
``read_used_seconds`` (the two persisted counts: the heartbeat's and the newest
checkpoint's).

Why two clocks: a Mac's monotonic clock (mach_absolute_time; CLOCK_MONOTONIC on Linux)
stops while the machine sleeps and the wall clock does not, so their difference between
two ticks is the time asleep, and only monotonic time is ever charged to the budget.

No MLX import and no hashing here: ``status`` imports this module and must be fast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mathlora_checkpoints.store import STATE_NAME, manifested_newest_first, read_json_object
from mathlora_daemon.rundir import RunDir

HEARTBEAT_KEY = "budget_used_s"
CHECKPOINT_KEY = "train_seconds"


@dataclass
class AwakeClock:
    """Splits the time between two ticks into awake seconds and slept seconds.

    ``sleep_threshold_s``: a wall-minus-monotonic gap at or below this is clock skew or
    an NTP slew, not sleep, and is reported as 0.
    """

    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    sleep_threshold_s: float = 30.0
    _last_monotonic: float = field(init=False, repr=False)
    _last_wall: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The first tick measures from construction.
        self._last_monotonic = self.monotonic()
        self._last_wall = self.wall()

    def tick(self) -> tuple[float, float]:
        """Return (awake seconds, slept seconds) since the previous tick (or construction);
        both are >= 0, and slept is 0.0 unless the gap exceeds the threshold."""
        mono, wall = self.monotonic(), self.wall()
        awake = max(0.0, mono - self._last_monotonic)
        # A wall clock stepped backwards (NTP) makes the gap negative: no sleep, not a refund.
        gap = (wall - self._last_wall) - awake
        slept = gap if gap > self.sleep_threshold_s else 0.0
        self._last_monotonic, self._last_wall = mono, wall
        return awake, slept


@dataclass
class Budget:
    """Training seconds allowed across all restarts (``total_s``) and spent so far."""

    total_s: float
    used_s: float = 0.0

    @property
    def left_s(self) -> float:
        return max(0.0, self.total_s - self.used_s)

    @property
    def exhausted(self) -> bool:
        return self.used_s >= self.total_s

    def add(self, seconds: float) -> None:
        """Given seconds of training just spent, charge them; raise ValueError when they
        are negative or not finite (the budget never gives time back)."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"budget seconds to add must be finite and >= 0, got {seconds!r}")
        self.used_s += seconds


def initial_used(heartbeat_used: float | None, checkpoint_used: float | None) -> float:
    """Given the heartbeat's and the newest checkpoint's used seconds (None when unknown),
    return where this start's count begins: the larger one (a crash after the last
    checkpoint never refunds the time it spent), 0.0 when neither is known."""
    known = [s for v in (heartbeat_used, checkpoint_used) if (s := _seconds(v)) is not None]
    return max(known, default=0.0)


def read_used_seconds(run: RunDir) -> tuple[float | None, float | None]:
    """Given a run directory, return (heartbeat ``budget_used_s`` from
    ``state/status.json``, ``train_seconds`` of the newest checkpoint), each None when
    absent or unreadable; never raises for a damaged run directory.

    The newest checkpoint is the highest ``checkpoints/step-<8 digits>/`` that has a
    MANIFEST.json and a trainer_state.json that parses with a usable train_seconds.
    The manifest's hashes are not checked: this is the cheap read for ``status`` and a
    lower bound for the budget; restore verifies properly.
    """
    heartbeat = read_json_object(run.status_file)
    heartbeat_used = _seconds(heartbeat.get(HEARTBEAT_KEY)) if heartbeat else None
    for path in manifested_newest_first(run.checkpoints):
        state = read_json_object(path / STATE_NAME)
        seconds = _seconds(state.get(CHECKPOINT_KEY)) if state else None
        if seconds is not None:
            return heartbeat_used, seconds
    return heartbeat_used, None


def _seconds(value) -> float | None:
    """Given a JSON value, return it as seconds when it is a finite number >= 0, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None
