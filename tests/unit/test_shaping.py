"""Per-destination shaping (gateway/delivery/shaping.py) with a fake clock: AIMD concurrency,
the pause doubling up to its maximum and ending, the rate, overrides, what throttles."""

from __future__ import annotations

from gateway.config.schema import DeliverySection, DestinationLimits
from gateway.delivery.outcome import BOUNCED, DEFERRED, SENT, RcptOutcome
from gateway.delivery.shaping import Shaper, Signal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def shaper(**keys) -> tuple[Shaper, Clock]:
    clock = Clock()
    section = DeliverySection(
        destination_concurrency=8, throttle_pause=60.0, throttle_pause_max=200.0, **keys
    )
    return Shaper(section, clock), clock


def out(status, reply: str, enhanced: str = "") -> list[RcptOutcome]:
    return [RcptOutcome(0, "x@d.example", status, reply, enhanced, from_far_end=True)]


def test_concurrency_limit_and_slots() -> None:
    s, _ = shaper()
    assert s.room("d.example") == 8
    assert all(s.start("d.example") for _ in range(8))
    assert not s.start("d.example") and s.room("d.example") == 0
    s.finish("d.example")
    assert s.room("d.example") == 1 and s.room("other.example") == 8  # others unaffected


def test_throttle_halves_pauses_doubles_and_success_resets() -> None:
    s, clock = shaper()
    s.record("d.example", out(DEFERRED, "421 4.7.0 Try again later"))
    assert s.paused("d.example") == 60.0 and s.room("d.example") == 0
    assert not s.start("d.example")
    clock.now += 61  # the cache entry expires: one probe may go (concurrency 4 now)
    assert s.paused("d.example") == 0 and s.room("d.example") == 4
    s.throttled("d.example", "421 again")
    assert s.paused("d.example") == 120.0 and s.room("d.example") == 0
    clock.now += 121
    s.throttled("d.example", "421 again")
    assert s.paused("d.example") == 200.0  # doubled to 240, held at throttle_pause_max
    clock.now += 201
    assert s.record("d.example", out(SENT, "250 ok")) == Signal.SUCCESS
    assert s.room("d.example") == 2  # 8 -> 4 -> 2 -> 1, +1 per success
    s.throttled("d.example", "421")
    assert s.paused("d.example") == 60.0  # a success forgot the pause: starts again at 1m


def test_a_throttle_during_a_pause_does_not_extend_it() -> None:
    s, clock = shaper()
    s.throttled("d.example", "421")
    clock.now += 30
    s.throttled("d.example", "421 from an attempt already running")
    assert s.paused("d.example") == 30.0


def test_what_throttles() -> None:
    s, _ = shaper()
    assert s.classify(out(DEFERRED, "421 4.4.2 closing"))[0] == Signal.THROTTLED
    assert s.classify(out(DEFERRED, "451 4.7.1 Rate limit exceeded"))[0] == Signal.THROTTLED
    assert s.classify(out(DEFERRED, "Error connecting", "4.4.1"))[0] == Signal.THROTTLED
    assert s.classify(out(DEFERRED, "450 4.2.0 greylisted"))[0] == Signal.NEUTRAL
    assert s.classify(out(BOUNCED, "550 5.1.1 no such user"))[0] == Signal.NEUTRAL
    mixed = out(DEFERRED, "421 busy") + out(SENT, "250 ok")
    assert s.classify(mixed)[0] == Signal.SUCCESS


def test_overrides_and_rate() -> None:
    big = DestinationLimits(domains=["big.example"], concurrency=50, rate=2.0)
    s, clock = shaper(destinations=[big], destination_rate=0.0)
    assert s.limits("big.example") == (50, 2.0) and s.limits("small.example") == (8, 0.0)
    assert s.start("big.example") and s.start("big.example")  # a second's burst
    assert not s.start("big.example") and s.wait("big.example") > 0
    clock.now += 0.5
    assert s.start("big.example")


def test_idle_destinations_are_forgotten() -> None:
    s, clock = shaper()
    s.start("d.example")
    s.finish("d.example")
    s.throttled("p.example", "421")
    clock.now += 7200
    s.throttled("q.example", "421")
    s.forget_idle()
    assert "d.example" not in s._states and "q.example" in s._states


def test_an_operators_flush_ends_a_pause_but_not_the_dead_host_memory() -> None:
    s, _clock = shaper()
    s.throttled("d.example", "421")
    s.throttled("e.example", "421")
    assert s.unpause("d.example") == ["d.example"]
    assert s.paused("d.example") == 0 and s.paused("e.example") == 60.0
    s.throttled("d.example", "421 the probe failed too")
    assert s.paused("d.example") == 120.0  # doubled: the dead host is still remembered
    assert sorted(s.unpause(None)) == ["d.example", "e.example"]
    assert s.unpause("never-seen.example") == []
