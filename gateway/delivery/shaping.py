"""Traffic shaping per destination (recipient domain), like Postfix's per-destination
concurrency and dead-host cache and KumoMTA's 421 feedback.

Each destination has a concurrency limit and a message rate (``delivery.destination_*``,
``[[delivery.destinations]]`` for big providers).  The concurrency in use moves between 1 and
that limit (AIMD): a throttle signal (a ``421``, a 4xx matching ``delivery.throttle_replies``,
or no MX host taking a connection at all) halves it and pauses the destination for
``throttle_pause``, doubled at each throttle in a row up to ``throttle_pause_max`` (the
dead-host cache); when the pause is over one message probes, and a delivery raises the limit by
one per success and forgets the pause.  The scheduler asks :meth:`Shaper.room` before it takes
a destination's messages, so a paused or full destination never holds a worker or delays the
others (no head-of-line blocking), and the spool's due scan skips it at no cost.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from gateway.config.schema import DeliverySection
from gateway.delivery.outcome import DEFERRED, SENT, RcptOutcome
from gateway.log import event

log = logging.getLogger("smg.delivery")

MAX_TRACKED = 100_000  # destinations remembered; beyond, idle unpaused ones are forgotten
IDLE_FORGET = 3600.0  # an unpaused destination without attempts for this long is forgotten
NO_HOST = "4.4.1"  # no MX host took a connection (routing: connect, greeting, EHLO failed)


class Signal(Enum):
    SUCCESS = "success"
    THROTTLED = "throttled"
    NEUTRAL = "neutral"  # a bounce, one recipient's deferral: says nothing about the destination


@dataclass
class _State:
    maximum: int
    rate: float  # messages per second, 0: no limit
    limit: float  # the concurrency in use now (AIMD between 1 and maximum)
    in_flight: int = 0
    paused_until: float = 0.0
    pause: float = 0.0  # the last pause (doubled at the next throttle in a row)
    reason: str = ""
    tokens: float = 1.0
    refilled: float = 0.0
    last_used: float = field(default_factory=time.monotonic)


class Shaper:
    """Per destination state on the event loop (one per relay process: with several workers
    each shapes its own share; the limits are per worker, see docs/queue.md)."""

    def __init__(
        self, section: DeliverySection, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        self._states: dict[str, _State] = {}
        self.configure(section)

    def configure(self, section: DeliverySection) -> None:
        """New settings (start, SIGHUP); destinations keep their pauses."""
        self.section = section
        self._patterns = [re.compile(p) for p in section.throttle_replies]
        self._overrides: dict[str, tuple[int, float]] = {}
        for entry in section.destinations:
            concurrency = entry.concurrency or section.destination_concurrency
            rate = section.destination_rate if entry.rate is None else entry.rate
            for domain in entry.domains:
                self._overrides[domain.lower()] = (concurrency, rate)
        for name, state in self._states.items():
            state.maximum, state.rate = self.limits(name)
            state.limit = min(state.limit, state.maximum)

    def limits(self, destination: str) -> tuple[int, float]:
        """(concurrency, messages per second) for ``destination``."""
        default = (self.section.destination_concurrency, self.section.destination_rate)
        return self._overrides.get(destination, default)

    def _state(self, destination: str) -> _State:
        state = self._states.get(destination)
        if state is None:
            if len(self._states) >= MAX_TRACKED:
                self._forget_idle(force=True)
            maximum, rate = self.limits(destination)
            state = _State(maximum, rate, float(maximum), tokens=max(1.0, rate))
            state.refilled = self.clock()
            self._states[destination] = state
        return state

    # -- the scheduler's questions ------------------------------------------------------------

    def paused(self, destination: str) -> float:
        """Seconds until ``destination``'s pause ends (0: not paused)."""
        state = self._states.get(destination)
        if state is None:
            return 0.0
        return max(0.0, state.paused_until - self.clock())

    def room(self, destination: str) -> int:
        """How many more attempts ``destination`` may start now (0: paused or full).  Reads
        only, so the spool's reader thread may call it."""
        state = self._states.get(destination)
        if state is None:
            return self.limits(destination)[0]
        if state.paused_until > self.clock():
            return 0
        free = max(0, int(state.limit) - state.in_flight)
        return min(free, max(1, int(self._tokens(state)))) if state.rate else free

    def wait(self, destination: str) -> float:
        """Seconds until the rate lets ``destination`` send again (0: now)."""
        state = self._states.get(destination)
        if state is None or not state.rate:
            return 0.0
        return max(0.0, (1.0 - self._tokens(state)) / state.rate)

    def _tokens(self, state: _State) -> float:
        burst = max(1.0, state.rate)  # at most a second's worth at once
        return min(burst, state.tokens + (self.clock() - state.refilled) * state.rate)

    def start(self, destination: str) -> bool:
        """Take a slot (and a token) for one attempt; False: paused, full or too fast."""
        state = self._state(destination)
        now = self.clock()
        if state.paused_until > now or state.in_flight >= int(state.limit):
            return False
        if state.rate:
            tokens = self._tokens(state)
            if tokens < 1.0:
                return False
            state.tokens, state.refilled = tokens - 1.0, now
        state.in_flight += 1
        state.last_used = now
        return True

    def finish(self, destination: str) -> None:
        state = self._states.get(destination)
        if state is not None:
            state.in_flight = max(0, state.in_flight - 1)

    # -- what the far end said ------------------------------------------------------------------

    def classify(self, outcomes: Iterable[RcptOutcome]) -> tuple[Signal, str]:
        """A destination's signal from one attempt's outcomes for it, and the reply behind it."""
        throttled = ""
        for outcome in outcomes:
            if outcome.status == SENT:
                return Signal.SUCCESS, ""
            if outcome.status != DEFERRED:
                continue
            if outcome.enhanced == NO_HOST or any(p.search(outcome.reply) for p in self._patterns):
                throttled = throttled or outcome.reply
        return (Signal.THROTTLED, throttled) if throttled else (Signal.NEUTRAL, "")

    def record(self, destination: str, outcomes: Iterable[RcptOutcome]) -> Signal:
        signal, reply = self.classify(outcomes)
        if signal == Signal.SUCCESS:
            self.success(destination)
        elif signal == Signal.THROTTLED:
            self.throttled(destination, reply)
        return signal

    def success(self, destination: str) -> None:
        state = self._state(destination)
        state.limit = min(float(state.maximum), state.limit + 1.0)
        if state.pause and state.paused_until <= self.clock():
            state.pause, state.reason = 0.0, ""
            event(log, "destination_resumed", destination=destination)

    def throttled(self, destination: str, reply: str) -> None:
        """Halve the concurrency and pause; a throttle during a pause (attempts that were
        already running) does not lengthen it again."""
        state = self._state(destination)
        now = self.clock()
        state.limit = max(1.0, state.limit / 2)
        if state.paused_until > now:
            return
        section = self.section
        pause = section.throttle_pause if not state.pause else state.pause * 2
        state.pause = min(pause, section.throttle_pause_max)
        state.paused_until, state.reason = now + state.pause, reply[:300]
        event(log, "destination_paused", level=logging.WARNING, destination=destination,
              seconds=f"{state.pause:g}", concurrency=int(state.limit),
              reply=state.reason)  # fmt: skip

    def unpause(self, destination: str | None) -> list[str]:
        """End the pause of ``destination`` (None: of every destination) now, as an operator's
        flush asks; the next attempt is the probe, and its failure pauses again, for twice as
        long (the dead-host cache is not forgotten).  The destinations whose pause ended."""
        now = self.clock()
        names = list(self._states) if destination is None else [destination]
        ended = []
        for name in names:
            state = self._states.get(name)
            if state is not None and state.paused_until > now:
                state.paused_until = now
                ended.append(name)
                event(log, "destination_unpaused", destination=name, by="flush")
        return ended

    def reason(self, destination: str) -> str:
        state = self._states.get(destination)
        return state.reason if state else ""

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per destination with a pause or mail in flight (metrics, logs, tests)."""
        now = self.clock()
        return {
            name: {
                "concurrency": int(s.limit),
                "in_flight": s.in_flight,
                "paused": max(0.0, s.paused_until - now),
            }
            for name, s in self._states.items()
            if s.in_flight or s.paused_until > now or s.limit < s.maximum
        }

    def forget_idle(self) -> None:
        self._forget_idle(force=False)

    def _forget_idle(self, force: bool) -> None:
        """The dead-host cache's expiry: destinations without a pause and without attempts for
        IDLE_FORGET are dropped (``force``: any unpaused idle one, the table is full)."""
        now = self.clock()
        for name, state in list(self._states.items()):
            idle = now - state.last_used > (0 if force else IDLE_FORGET)
            if idle and not state.in_flight and state.paused_until <= now:
                del self._states[name]
