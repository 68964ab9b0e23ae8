import time

from jetscribe.shared.clock import ManualClock, system_clock


def test_the_offset_moves_monotonic_time_only(monkeypatch):
    monkeypatch.setenv("JETSCRIBE_CLOCK_OFFSET_S", "864000")
    clock = system_clock()
    assert clock.monotonic() - time.monotonic() >= 864000 - 1
    assert abs(clock.wall() - time.time()) < 1


def test_manual_clock_starts_far_from_zero_and_moves_when_told():
    clock = ManualClock()
    start = clock.monotonic()
    assert start >= 864000
    clock.advance(2.5)
    assert clock.monotonic() == start + 2.5
