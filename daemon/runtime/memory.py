"""Memory guard: read MLX and system memory figures, classify pressure, emit transitions.

A 7B model with LoRA on a laptop runs close to the machine's unified memory. The guard
turns a stream of readings into a few log events (`memory.warning`, `memory.critical`,
`memory.recovered`) and tells the caller when to drop MLX's buffer cache; the caller
decides what to do on `critical` (checkpoint and wait in-process, see docs/DESIGN.md, "Exit codes").

MLX is imported only inside the functions that need it, so importing this module is
cheap (the CLI's quick commands may import it indirectly).
"""

from __future__ import annotations

import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil

GIB = 1024 ** 3
LEVELS = ("ok", "warning", "critical")
_RANK = {name: i for i, name in enumerate(LEVELS)}
WARNING_REPEAT_S = 600.0  # a lasting warning is repeated this often, not on every step
MIN_HYSTERESIS_GB = 0.5
HYSTERESIS_FRACTION = 0.10


@dataclass
class MemoryReading:
    """One sample of memory figures, all in GiB."""

    mem_active_gb: float
    mem_cache_gb: float
    mem_peak_gb: float
    rss_gb: float
    sys_available_gb: float
    swap_used_gb: float

    def as_fields(self) -> dict:
        """Return the figures as log fields (rounded to 3 decimals)."""
        return {
            "mem_active_gb": round(self.mem_active_gb, 3),
            "mem_cache_gb": round(self.mem_cache_gb, 3),
            "mem_peak_gb": round(self.mem_peak_gb, 3),
            "rss_gb": round(self.rss_gb, 3),
            "sys_available_gb": round(self.sys_available_gb, 3),
            "swap_used_gb": round(self.swap_used_gb, 3),
        }


def read_mlx_bytes() -> tuple[int, int, int]:
    """Return MLX's (active, cache, peak) memory in bytes; imports mlx.core lazily."""
    import mlx.core as mx

    return mx.get_active_memory(), mx.get_cache_memory(), mx.get_peak_memory()


def read_memory(mlx_reader: Callable[[], tuple[int, int, int]] | None = None,
                psutil_module: Any = psutil) -> MemoryReading:
    """Given an MLX reader returning (active, cache, peak) bytes (default: MLX itself)
    and a psutil-like module, return a MemoryReading in GiB."""
    active, cache, peak = (mlx_reader or read_mlx_bytes)()
    rss = psutil_module.Process().memory_info().rss
    available = psutil_module.virtual_memory().available
    swap_used = psutil_module.swap_memory().used
    return MemoryReading(
        mem_active_gb=active / GIB,
        mem_cache_gb=cache / GIB,
        mem_peak_gb=peak / GIB,
        rss_gb=rss / GIB,
        sys_available_gb=available / GIB,
        swap_used_gb=swap_used / GIB,
    )


@dataclass
class MemoryThresholds:
    """Limits in GiB: below `*_available_gb` of free system memory, or above `*_rss_gb`
    of process memory (0 = that RSS check is off), a reading is warning/critical."""

    warning_available_gb: float
    critical_available_gb: float
    warning_rss_gb: float = 0.0
    critical_rss_gb: float = 0.0


def _breaches(reading: MemoryReading, available_gb: float, rss_gb: float) -> bool:
    return reading.sys_available_gb < available_gb or (rss_gb > 0 and reading.rss_gb > rss_gb)


def hysteresis_gb(threshold_gb: float) -> float:
    """Given a threshold, return the margin a reading must clear to leave its level."""
    return max(MIN_HYSTERESIS_GB, HYSTERESIS_FRACTION * threshold_gb)


def _clears(reading: MemoryReading, available_gb: float, rss_gb: float) -> bool:
    """Whether a reading is past both limits by the hysteresis margin (0 = limit off)."""
    available_ok = available_gb <= 0 or reading.sys_available_gb >= available_gb + hysteresis_gb(available_gb)
    rss_ok = rss_gb <= 0 or reading.rss_gb <= rss_gb - hysteresis_gb(rss_gb)
    return available_ok and rss_ok


def classify(reading: MemoryReading, thresholds: MemoryThresholds) -> str:
    """Given a reading and thresholds, return "critical", "warning" or "ok" (no
    hysteresis: the raw level of this one reading)."""
    if _breaches(reading, thresholds.critical_available_gb, thresholds.critical_rss_gb):
        return "critical"
    if _breaches(reading, thresholds.warning_available_gb, thresholds.warning_rss_gb):
        return "warning"
    return "ok"


@dataclass
class MemoryGuard:
    """Tracks the memory level across readings and reports only the transitions.

    `check()` is called once per step (or while waiting). After each call
    `should_clear_cache` says whether this reading asks the caller to run
    `mx.clear_cache()` (entering warning or critical, or a repeated warning); it is
    reset by the next call. `level` is the current level with hysteresis applied, so
    the caller can wait while it is "critical".
    """

    thresholds: MemoryThresholds
    clock: Callable[[], float] = time.monotonic
    repeat_warning_s: float = WARNING_REPEAT_S
    level: str = "ok"
    should_clear_cache: bool = False
    _last_warning_at: float | None = field(default=None, init=False, repr=False)

    def _level_for(self, reading: MemoryReading) -> str:
        """Given a reading, return the new level: worse levels are entered at once,
        better ones only once the reading clears the worse limit by the hysteresis
        margin, so a reading hovering at a threshold does not flap."""
        raw = classify(reading, self.thresholds)
        if _RANK[raw] >= _RANK[self.level]:
            return raw
        t = self.thresholds
        if self.level == "critical" and not _clears(reading, t.critical_available_gb, t.critical_rss_gb):
            return "critical"
        if raw == "ok" and not _clears(reading, t.warning_available_gb, t.warning_rss_gb):
            return "warning"
        return raw

    def check(self, reading: MemoryReading) -> list[tuple[str, dict]]:
        """Given a reading, update the level and return the log events to emit
        ([] when nothing changed)."""
        previous, new = self.level, self._level_for(reading)
        self.level = new
        self.should_clear_cache = False
        fields = {**reading.as_fields(), "level": new, "previous": previous}
        now = self.clock()
        if new == previous:
            due = (new == "warning" and self._last_warning_at is not None
                   and now - self._last_warning_at >= self.repeat_warning_s)
            if not due:
                return []
            self._last_warning_at = now
            self.should_clear_cache = True
            return [("memory.warning", {**fields, "repeated": True})]
        if new == "critical":
            # Clearing the cache is the cheapest relief; the caller also checkpoints.
            self.should_clear_cache = True
            return [("memory.critical", fields)]
        if new == "warning":
            self._last_warning_at = now
            self.should_clear_cache = True
            return [("memory.warning", fields)]
        self._last_warning_at = None
        return [("memory.recovered", fields)]


# The memory limit MLX had chosen itself, per MLX module, kept when the daemon first sets
# one: a later limit of 0 (a config reload) puts it back.
_MLX_DEFAULT_LIMIT: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def apply_limits(memory_limit_gb: float, wired_limit: bool, mx_module: Any = None,
                 platform: str | None = None) -> dict:
    """Given a memory limit in GiB (0 = MLX's default: left alone, or restored when this
    process set another one before) and whether to wire the recommended working set,
    apply them to MLX and return what was set (for the log).

    The wired limit only exists on macOS (Metal); elsewhere it is skipped with a reason.
    With the real MLX, mlx_lm's `maybe_set_recommended_wired_limit` is used when it can
    be imported, so the daemon wires memory exactly as mlx-lm's own tools do.
    """
    real_mx = mx_module is None
    if real_mx:
        import mlx.core as mx_module
    platform = sys.platform if platform is None else platform
    applied: dict = {}
    if memory_limit_gb > 0:
        nbytes = int(memory_limit_gb * GIB)
        applied["previous_memory_limit_bytes"] = mx_module.set_memory_limit(nbytes)
        applied["memory_limit_bytes"] = nbytes
        _MLX_DEFAULT_LIMIT.setdefault(mx_module, applied["previous_memory_limit_bytes"])
    elif mx_module in _MLX_DEFAULT_LIMIT:
        nbytes = _MLX_DEFAULT_LIMIT[mx_module]
        applied["previous_memory_limit_bytes"] = mx_module.set_memory_limit(nbytes)
        applied["memory_limit_bytes"] = nbytes
    if wired_limit:
        if platform != "darwin":
            applied["wired_limit"] = f"skipped: wired memory is a macOS (Metal) feature, platform is {platform}"
            return applied
        recommended = mx_module.device_info().get("max_recommended_working_set_size")
        if recommended is None:
            applied["wired_limit"] = "skipped: the device reports no recommended working set size"
            return applied
        setter = None
        if real_mx:
            try:
                from mlx_lm.utils import maybe_set_recommended_wired_limit as setter
            except ImportError:
                setter = None
        previous = setter() if setter is not None else mx_module.set_wired_limit(recommended)
        applied["wired_limit_bytes"] = recommended
        applied["previous_wired_limit_bytes"] = previous
    return applied
