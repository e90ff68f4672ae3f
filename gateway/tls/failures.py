"""The recent TLS failures per destination, shared by delivery and the intake."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from gateway.domains import normalize_domain
from gateway.tls.levels import DANE, STRICTNESS, VERIFY, covers
from gateway.tls.mta_sts import StateFile


class TlsFailureCache:
    """Recent TLS failures per destination (recipient domain), shared by delivery and intake.

    Delivery calls :meth:`record_failure` when no MX of a domain met a required TLS level and
    :meth:`record_success` when TLS at some level worked; the intake's ``tls_known_failure``
    rule asks :meth:`recent_failure`.  Levels matter: a failure under ``encrypt`` (no STARTTLS)
    means ``verify`` fails too, but a failure under ``verify`` (a bad certificate) says nothing
    about ``encrypt``; likewise a success under ``encrypt`` does not clear a ``verify`` failure.
    Bounded to ``max_entries`` domains; entries expire after ``ttl`` seconds (wall clock).
    With a ``state`` file (the relay passes ``<spool>/tls-failures.json``) the memory is shared
    by the relay's worker processes: the worker that delivered is rarely the one that takes the
    next SMTP session.
    """

    def __init__(
        self,
        ttl: float,
        max_entries: int = 10000,
        clock: Callable[[], float] = time.time,
        state: StateFile | None = None,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self.state = state
        # domain -> {level failed at -> (when, reason)}
        self._failures: OrderedDict[str, dict[str, tuple[float, str]]] = OrderedDict()

    def record_failure(
        self, domain: str, reason: str = "TLS could not be established", level: str = VERIFY
    ) -> None:
        key, when = normalize_domain(domain), self._clock()

        def change(table: dict[str, Any]) -> None:
            entry = table.pop(key, {})
            entry[level] = (when, reason)
            table[key] = entry
            self._prune(table)

        self._change(change)

    def record_success(self, domain: str, level: str = VERIFY) -> None:
        """TLS at ``level`` worked: failures at that level or a weaker one are void."""
        key = normalize_domain(domain)

        def change(table: dict[str, Any]) -> None:
            entry = table.get(key, {})
            for failed_level in [lv for lv in entry if covers(lv, level)]:
                del entry[failed_level]
            if not entry:
                table.pop(key, None)

        if key in self._failures or (self.state is not None and self.state.changed()):
            self._change(change)

    def recent_failure(self, domain: str, level: str = VERIFY) -> str | None:
        """Why TLS at ``level`` to ``domain`` failed less than ``ttl`` seconds ago, else None."""
        if self.state is not None and self.state.changed():
            self._failures = self._from_table(self.state.load())
        entry = self._failures.get(normalize_domain(domain))
        if not entry:
            return None
        now = self._clock()
        relevant = [
            (when, reason)
            for failed_level, (when, reason) in entry.items()
            if covers(failed_level, level) and now - when <= self.ttl
        ]
        return max(relevant)[1] if relevant else None

    def _change(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Apply ``change`` to the shared table (or to the memory alone, without one)."""
        if self.state is not None:
            table = self.state.update(change)
            if table is not None:
                self._failures = self._from_table(table)
                return
        change(self._failures)

    def _prune(self, table: dict[str, Any]) -> None:
        now = self._clock()
        for key in list(table):
            table[key] = {lv: w for lv, w in table[key].items() if now - w[0] <= self.ttl}
            if not table[key]:
                del table[key]
        for key in list(table)[: max(0, len(table) - self.max_entries)]:
            del table[key]

    @staticmethod
    def _from_table(table: dict[str, Any] | None) -> OrderedDict[str, dict[str, tuple[float, str]]]:
        failures: OrderedDict[str, dict[str, tuple[float, str]]] = OrderedDict()
        for domain, entry in (table or {}).items():
            try:
                failures[domain] = {
                    level: (float(when), str(reason))
                    for level, (when, reason) in entry.items()
                    if level in STRICTNESS or level == DANE
                }
            except (TypeError, ValueError, AttributeError):
                continue  # a damaged entry is skipped, not fatal
        return failures
