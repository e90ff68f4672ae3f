"""The memory budget for message bytes in flight, shared by every session of one relay process.

A session reading DATA reserves each piece it reads before keeping it; when the budget is used
up it stops reading, so its socket's receive buffer fills and TCP makes the client wait (the
transport is paused by asyncio's StreamReader once its small buffer is full).  A session that
waited longer than its DATA timeout gives up with ``452 4.3.1`` (the client retries later;
nothing is lost).  What a session holds goes back when its DATA ends, whatever the ending
(queued, refused, disconnected, timed out): see :class:`Reservation`.

The budget counts the message bytes as read; the relay's memory for a message is a small
multiple of it (the joined copy, the prepared copy, SQLite's copy while storing: see
docs/operations.md, "Memory").
"""

from __future__ import annotations

import asyncio
import collections


class DataBudget:
    """``limit`` bytes for all sessions; waiters are served first come, first served, so a
    large message is not starved by a stream of small ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.holders = 0  # reservations holding bytes
        self.stuck = 0  # of those, the ones waiting for more
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def resize(self, limit: int) -> None:
        """A reload's new size: what is held stays held, waiters may fit now."""
        self.limit = limit
        self._wake()

    def reservation(self) -> Reservation:
        return Reservation(self)

    def _try_take(self, size: int) -> bool:
        if size == 0:
            return True
        if self._waiters or self.used + size > self.limit:
            return False
        self.used += size
        return True

    async def _take(self, size: int) -> None:
        if self._try_take(size):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.used -= size  # granted just as we gave up: hand it back
            else:
                self._waiters.remove(entry)
            self._wake()
            raise

    def _give(self, size: int) -> None:
        self.used -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.used + size > self.limit:
                return
            self._waiters.popleft()
            self.used += size
            future.set_result(None)


class Reservation:
    """One session's share for one DATA: :meth:`take` before keeping bytes, :meth:`release`
    (idempotent) when the message is queued or dropped.  :meth:`prepay` takes a declared size
    at once, so a client that said ``SIZE=`` never waits halfway through its message."""

    def __init__(self, budget: DataBudget) -> None:
        self.budget = budget
        self.held = 0
        self.spare = 0  # prepaid and not used yet

    def take_now(self, size: int) -> bool:
        """Take ``size`` bytes if they are free right now (the usual case: no waiting)."""
        if size <= self.spare:
            self.spare -= size
            return True
        if not self.budget._try_take(size - self.spare):
            return False
        self._got(size - self.spare)
        self.spare = 0
        return True

    async def prepay(self, size: int, timeout: float) -> bool:
        if not await self.take(size, timeout):
            return False
        self.spare += size
        return True

    async def take(self, size: int, timeout: float) -> bool:
        """Take ``size`` bytes, waiting at most ``timeout`` seconds; False if they never came,
        or at once if every session holding a share would then be waiting (none of them
        could ever go on: this one gives up, and its share lets the others go on)."""
        if self.take_now(size):
            return True
        budget = self.budget
        if self.held and budget.stuck + 1 >= budget.holders:
            return False
        need = size - self.spare
        budget.stuck += bool(self.held)
        stuck = bool(self.held)
        try:
            await asyncio.wait_for(budget._take(need), max(timeout, 0.0))
        except TimeoutError:
            return False
        finally:
            budget.stuck -= stuck
        self._got(need)
        self.spare = 0
        return True

    def _got(self, size: int) -> None:
        if size and not self.held:
            self.budget.holders += 1
        self.held += size

    def release(self) -> None:
        held, self.held, self.spare = self.held, 0, 0
        if held:
            self.budget.holders -= 1
            self.budget._give(held)
