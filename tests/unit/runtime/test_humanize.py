"""Human times and durations (status, logs, checkpoints list, the progress bar)."""

from datetime import datetime

from mathlora_daemon.runtime.humanize import ago, duration, local_time


def test_durations_read_as_people_say_them():
    assert duration(None) == "?"
    assert duration(-3) == "0 s"
    assert duration(45.4) == "45 s"
    assert duration(60) == "1 min"
    assert duration(14 * 60 + 59) == "14 min"
    assert duration(2 * 3600 + 14 * 60 + 10) == "2 h 14 min"
    assert duration(16 * 3600) == "16 h"
    assert duration(15 * 3600 + 59 * 60 + 40) == "15 h 59 min"
    assert duration(3 * 86400 + 4 * 3600) == "3 days 4 h"


def test_local_times_drop_what_the_reader_already_knows():
    ref = datetime(2026, 12, 1, 18, 0).timestamp()
    assert local_time(datetime(2026, 12, 1, 4, 28).timestamp(), ref) == "04:28"
    assert local_time(datetime(2026, 12, 2, 4, 28).timestamp(), ref) == "Wed 04:28"
    assert local_time(datetime(2026, 10, 2, 4, 28).timestamp(), ref) == "2026-10-02 04:28"
    assert local_time(datetime(2026, 10, 2, 4, 28).timestamp()) == "2026-10-02 04:28"
    assert ago(ref - 8040, ref) == "15:46 (2 h 14 min ago)"
    assert ago(ref + 600, ref) == "18:10 (in 10 min)"
