"""Memory guard: classification, transition events with hysteresis, readings, limits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mathlora_daemon.runtime.memory import (
    GIB,
    MemoryGuard,
    MemoryReading,
    MemoryThresholds,
    apply_limits,
    classify,
    hysteresis_gb,
    read_memory,
)

T = MemoryThresholds(warning_available_gb=4.0, critical_available_gb=2.0, warning_rss_gb=20.0, critical_rss_gb=30.0)


def reading(available: float, rss: float = 1.0) -> MemoryReading:
    return MemoryReading(mem_active_gb=1.0, mem_cache_gb=0.5, mem_peak_gb=1.5, rss_gb=rss,
                         sys_available_gb=available, swap_used_gb=0.0)


@pytest.mark.parametrize("available, rss, thresholds, expected", [
    (10.0, 1.0, T, "ok"),
    (4.0, 1.0, T, "ok"),            # at the threshold is not below it
    (3.99, 1.0, T, "warning"),
    (2.0, 1.0, T, "warning"),
    (1.99, 1.0, T, "critical"),
    (10.0, 20.5, T, "warning"),     # RSS alone can raise the level
    (10.0, 30.5, T, "critical"),
    (3.0, 30.5, T, "critical"),     # the worse of the two wins
    (10.0, 500.0, MemoryThresholds(4.0, 2.0), "ok"),  # RSS checks off by default
])
def test_classify_table(available, rss, thresholds, expected):
    assert classify(reading(available, rss), thresholds) == expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def names(events):
    return [name for name, _ in events]


def test_transitions_ok_warning_critical_recovered_without_repeats():
    clock = FakeClock()
    guard = MemoryGuard(T, clock=clock)
    assert guard.check(reading(10.0)) == [] and guard.level == "ok"
    assert not guard.should_clear_cache

    events = guard.check(reading(3.5))
    assert names(events) == ["memory.warning"]
    assert events[0][1]["sys_available_gb"] == 3.5 and events[0][1]["previous"] == "ok"
    assert guard.should_clear_cache
    assert guard.check(reading(3.4)) == [] and not guard.should_clear_cache

    events = guard.check(reading(1.5))
    assert names(events) == ["memory.critical"] and guard.level == "critical"
    assert guard.check(reading(1.2)) == []

    events = guard.check(reading(10.0))
    assert names(events) == ["memory.recovered"]
    assert events[0][1]["previous"] == "critical" and guard.level == "ok"
    assert guard.check(reading(10.0)) == []


def test_warning_repeats_at_most_every_ten_minutes():
    clock = FakeClock()
    guard = MemoryGuard(T, clock=clock)
    assert names(guard.check(reading(3.0))) == ["memory.warning"]
    clock.now += 599
    assert guard.check(reading(3.0)) == []
    clock.now += 1
    events = guard.check(reading(3.0))
    assert names(events) == ["memory.warning"] and events[0][1]["repeated"] is True
    assert guard.should_clear_cache
    clock.now += 10
    assert guard.check(reading(3.0)) == []


def test_recovery_from_critical_needs_hysteresis():
    guard = MemoryGuard(T, clock=FakeClock())
    margin = hysteresis_gb(T.critical_available_gb)
    assert margin == 0.5  # max(0.5, 10% of 2.0)
    assert hysteresis_gb(40.0) == pytest.approx(4.0)

    assert names(guard.check(reading(1.9))) == ["memory.critical"]
    # Just above the critical threshold but inside the margin: still critical, silent.
    assert guard.check(reading(2.1)) == [] and guard.level == "critical"
    assert guard.check(reading(1.95)) == []
    assert guard.check(reading(2.0 + margin - 0.01)) == []
    # Clear of the margin but still under the warning threshold: down to warning.
    events = guard.check(reading(2.0 + margin))
    assert names(events) == ["memory.warning"] and events[0][1]["previous"] == "critical"
    assert guard.level == "warning"
    # Leaving warning needs its own margin too (4.0 + 0.5).
    assert guard.check(reading(4.2)) == [] and guard.level == "warning"
    assert names(guard.check(reading(4.5))) == ["memory.recovered"]


def test_recovery_from_rss_critical_needs_hysteresis():
    guard = MemoryGuard(T, clock=FakeClock())
    assert names(guard.check(reading(10.0, rss=31.0))) == ["memory.critical"]
    assert guard.check(reading(10.0, rss=29.5)) == []  # margin is 3.0 GiB (10% of 30)
    assert names(guard.check(reading(10.0, rss=26.9))) == ["memory.warning"]
    assert names(guard.check(reading(10.0, rss=17.9))) == ["memory.recovered"]


def test_read_memory_with_fake_sources():
    fake_psutil = SimpleNamespace(
        Process=lambda: SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=3 * GIB)),
        virtual_memory=lambda: SimpleNamespace(available=12 * GIB + GIB // 2),
        swap_memory=lambda: SimpleNamespace(used=GIB // 4),
    )
    r = read_memory(mlx_reader=lambda: (2 * GIB, GIB, 5 * GIB), psutil_module=fake_psutil)
    assert r == MemoryReading(mem_active_gb=2.0, mem_cache_gb=1.0, mem_peak_gb=5.0, rss_gb=3.0,
                              sys_available_gb=12.5, swap_used_gb=0.25)
    fields = MemoryReading(1.23456, 0, 0, 0, 0, 0).as_fields()
    assert fields["mem_active_gb"] == 1.235
    assert set(fields) == {"mem_active_gb", "mem_cache_gb", "mem_peak_gb", "rss_gb",
                           "sys_available_gb", "swap_used_gb"}


def test_real_read_memory_on_this_machine():
    import mlx.core as mx

    keep = mx.ones((256, 256))
    mx.eval(keep)
    r = read_memory()
    assert r.rss_gb > 0 and r.sys_available_gb > 0 and r.mem_peak_gb > 0
    assert r.swap_used_gb >= 0 and r.mem_active_gb >= 0 and r.mem_cache_gb >= 0


class FakeMx:
    def __init__(self, recommended=None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.recommended = recommended

    def set_memory_limit(self, n: int) -> int:
        self.calls.append(("set_memory_limit", n))
        return 111

    def set_wired_limit(self, n: int) -> int:
        self.calls.append(("set_wired_limit", n))
        return 0

    def device_info(self) -> dict:
        return {} if self.recommended is None else {"max_recommended_working_set_size": self.recommended}


def test_apply_limits_records_calls():
    mx = FakeMx(recommended=48 * GIB)
    applied = apply_limits(24.0, True, mx_module=mx, platform="darwin")
    assert mx.calls == [("set_memory_limit", 24 * GIB), ("set_wired_limit", 48 * GIB)]
    assert applied == {"memory_limit_bytes": 24 * GIB, "previous_memory_limit_bytes": 111,
                       "wired_limit_bytes": 48 * GIB, "previous_wired_limit_bytes": 0}


def test_a_limit_of_0_after_another_puts_mlx_s_own_default_back():
    mx = FakeMx()
    apply_limits(24.0, False, mx_module=mx, platform="linux")  # MLX had 111 bytes as its own limit
    apply_limits(8.0, False, mx_module=mx, platform="linux")
    applied = apply_limits(0, False, mx_module=mx, platform="linux")
    assert mx.calls == [("set_memory_limit", 24 * GIB), ("set_memory_limit", 8 * GIB), ("set_memory_limit", 111)]
    assert applied == {"memory_limit_bytes": 111, "previous_memory_limit_bytes": 111}  # (the fake always answers 111)


def test_apply_limits_skips_what_is_off_or_unavailable():
    mx = FakeMx(recommended=48 * GIB)
    assert apply_limits(0, False, mx_module=mx, platform="darwin") == {} and mx.calls == []

    applied = apply_limits(0, True, mx_module=mx, platform="linux")
    assert mx.calls == [] and "macOS" in applied["wired_limit"]

    mx = FakeMx(recommended=None)
    applied = apply_limits(0, True, mx_module=mx, platform="darwin")
    assert mx.calls == [] and "no recommended" in applied["wired_limit"]
