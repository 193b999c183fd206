"""Tests for daemon.schedule: parsing "HH:MM-HH:MM", inside/outside including windows
that wrap past midnight, and the next end/start on naive local datetimes."""

from __future__ import annotations

import datetime as dt

import pytest

from mathlora_daemon.runtime.schedule import Window, inside, next_start, parse_window, window_end

NIGHT = Window(dt.time(22, 0), dt.time(7, 0))
DAY = Window(dt.time(9, 30), dt.time(17, 0))


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


# --- parse_window ------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("", None),
    ("22:00-07:00", NIGHT),
    ("09:30-17:00", DAY),
    ("00:00-23:59", Window(dt.time(0, 0), dt.time(23, 59))),
])
def test_parse_window(text, expected):
    assert parse_window(text) == expected


@pytest.mark.parametrize("text", ["22:00", "22-07", "9:30-17:00", "24:00-07:00", "22:60-07:00", " 22:00-07:00",
                                  "22:00 - 07:00", "22:00-07:00x", "nightly"])
def test_parse_window_rejects_malformed_text(text):
    with pytest.raises(ValueError, match=r"is not \"HH:MM-HH:MM\""):
        parse_window(text)


def test_parse_window_rejects_empty_window():
    with pytest.raises(ValueError, match="starts and ends at the same time"):
        parse_window("07:00-07:00")


def test_window_str_round_trips():
    assert str(NIGHT) == "22:00-07:00" and parse_window(str(DAY)) == DAY


# --- inside ------------------------------------------------------------------------------

@pytest.mark.parametrize("window, now, expected", [
    (None, "2024-06-01 12:00", True),
    (DAY, "2024-06-01 09:29:59.999999", False),
    (DAY, "2024-06-01 09:30", True),            # start inclusive
    (DAY, "2024-06-01 16:59:59", True),
    (DAY, "2024-06-01 17:00", False),           # end exclusive
    (DAY, "2024-06-01 00:00", False),
    (NIGHT, "2024-06-01 21:59:59", False),
    (NIGHT, "2024-06-01 22:00", True),
    (NIGHT, "2024-06-01 23:59:59", True),
    (NIGHT, "2024-06-02 00:00", True),          # past midnight
    (NIGHT, "2024-06-02 06:59:59", True),
    (NIGHT, "2024-06-02 07:00", False),
    (NIGHT, "2024-06-02 12:00", False),
    (NIGHT, "2024-03-10 02:30", True),          # a US spring-forward hour: the clock time counts
])
def test_inside(window, now, expected):
    assert inside(window, at(now)) is expected


# --- window_end / next_start -------------------------------------------------------------

@pytest.mark.parametrize("window, now, end, start", [
    (None, "2024-06-01 12:00", None, None),
    # a day window: before, inside, at the end, after
    (DAY, "2024-06-01 08:00", "2024-06-01 17:00", "2024-06-01 09:30"),
    (DAY, "2024-06-01 09:30", "2024-06-01 17:00", "2024-06-02 09:30"),
    (DAY, "2024-06-01 12:00", "2024-06-01 17:00", "2024-06-02 09:30"),
    (DAY, "2024-06-01 17:00", "2024-06-02 17:00", "2024-06-02 09:30"),
    (DAY, "2024-06-01 23:00", "2024-06-02 17:00", "2024-06-02 09:30"),
    # a night window wrapping midnight
    (NIGHT, "2024-06-01 21:59", "2024-06-02 07:00", "2024-06-01 22:00"),
    (NIGHT, "2024-06-01 22:00", "2024-06-02 07:00", "2024-06-02 22:00"),
    (NIGHT, "2024-06-01 23:30", "2024-06-02 07:00", "2024-06-02 22:00"),
    (NIGHT, "2024-06-02 03:00", "2024-06-02 07:00", "2024-06-02 22:00"),
    (NIGHT, "2024-06-02 07:00", "2024-06-03 07:00", "2024-06-02 22:00"),
    (NIGHT, "2024-06-02 12:00", "2024-06-03 07:00", "2024-06-02 22:00"),
    # month, year and leap-day boundaries
    (NIGHT, "2024-06-30 23:00", "2024-07-01 07:00", "2024-07-01 22:00"),
    (NIGHT, "2023-12-31 22:30", "2024-01-01 07:00", "2024-01-01 22:00"),
    (NIGHT, "2024-02-28 23:00", "2024-02-29 07:00", "2024-02-29 22:00"),
    # DST change nights (US 2024-03-10 / 2024-11-03, EU 2024-03-31): wall-clock arithmetic
    (NIGHT, "2024-03-09 23:00", "2024-03-10 07:00", "2024-03-10 22:00"),
    (NIGHT, "2024-11-02 23:00", "2024-11-03 07:00", "2024-11-03 22:00"),
    (Window(dt.time(2, 0), dt.time(3, 0)), "2024-03-31 01:00", "2024-03-31 03:00", "2024-03-31 02:00"),
])
def test_window_end_and_next_start(window, now, end, start):
    now = at(now)
    assert window_end(window, now) == (at(end) if end else None)
    assert next_start(window, now) == (at(start) if start else None)
    if window is not None:
        # The end is the closing of the window we are in, or of the next one.
        assert window_end(window, now) > now and next_start(window, now) > now
        if not inside(window, now):
            assert next_start(window, now) < window_end(window, now)
            assert inside(window, next_start(window, now))
        assert not inside(window, window_end(window, now))


def test_aware_datetimes_keep_their_tzinfo():
    tz = dt.timezone(dt.timedelta(hours=2))
    now = dt.datetime(2024, 6, 1, 23, 0, tzinfo=tz)
    assert window_end(NIGHT, now) == dt.datetime(2024, 6, 2, 7, 0, tzinfo=tz)
    assert next_start(NIGHT, now).tzinfo is tz
    assert window_end(NIGHT, dt.datetime(2024, 6, 1, 23, 0)).tzinfo is None
