"""MTA-STS (RFC 8461): a recipient domain's published demand for verified TLS to named MX hosts.

Discovery: the TXT record ``_mta-sts.<domain>`` (``v=STSv1; id=...``) says a policy exists and
which version it is; the policy itself is fetched from
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (port ``mta_sts.https_port``, verified against
``mta_sts.ca_bundle`` or the system CAs, redirects NOT followed, size and time bounded), and
only from a public address (``Resolver.is_public``): a policy host on an internal address is
not fetched, as for delivery.

Caching: a policy is kept for its ``max_age``.  It is fetched again when the TXT ``id`` changes
or the cached copy expired.  If a refresh fails (DNS, HTTPS, a bad policy), the cached policy
stays in use until it expires (RFC 8461 section 5.1): an attacker who blocks the refresh must not
downgrade the domain to cleartext.  Without a usable policy the domain has none.  With a
``state`` file (the relay passes ``<spool>/mta-sts.json``) the cache is shared by the relay's
worker processes and survives a restart.

:class:`StateFile` (that shared JSON table) lives here too; the TLS failure memory uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import MtaStsSection
from gateway.dns import Resolver

log = logging.getLogger("smg.mta_sts")

POLICY_PATH = "/.well-known/mta-sts.txt"
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 section 3.3 suggests 64 KiB
MAX_AGE_LIMIT = 31557600  # RFC 8461 section 3.2: at most one year
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
MODES = ("enforce", "testing", "none")
MAX_CACHED_DOMAINS = 10000
REFETCH_AFTER_FAILURE = 60.0  # seconds before a policy id whose fetch failed is tried again


class MtaStsError(Exception):
    """A policy could not be discovered, fetched or parsed; the message says why."""


@dataclass(frozen=True)
class MtaStsPolicy:
    domain: str
    policy_id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float = field(default_factory=time.time)  # wall clock: shared, persisted

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) >= self.fetched_at + self.max_age

    def allows_mx(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)


class StateFile:
    """A small JSON table shared by the relay's worker processes and kept across restarts.

    Read again only when the file changed (one ``stat`` per look); changed under an exclusive
    ``flock`` (read, merge, write a temporary file, rename), so workers do not lose each other's
    entries.  Best effort: an unreadable or unwritable place leaves the caller with what it has
    in memory, and says so once in the log.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._warned = False

    def changed(self) -> bool:
        try:
            st = self.path.stat()
        except OSError:
            return False
        return (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp

    def load(self) -> dict[str, Any] | None:
        """The table, or None if there is none (or it cannot be read)."""
        try:
            st = self.path.stat()
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._warn(f"cannot read {self.path}: {exc}")
            return None
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        return data if isinstance(data, dict) else None

    def update(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
        """Apply ``change`` to the table on disk; return the new table (None: not saved)."""
        try:
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                data = self.load() or {}
                change(data)
                temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
                replace_durably(self.path, temporary, json.dumps(data).encode("utf-8"))
                st = self.path.stat()
                self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                return data
        except OSError as exc:
            self._warn(f"cannot write {self.path}: {exc}")
            return None

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s (kept in this process's memory only)", message)


def replace_durably(path: Path, temporary: Path, data: bytes) -> None:
    """Write ``data`` to ``temporary``, fsync it, rename it over ``path`` and fsync the
    directory: after a power cut the file is the old table or the new one, never empty (a
    rename can reach the disk before the data it names)."""
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# --- matching and parsing -------------------------------------------------------------------


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 section 4.1: ``mx.example.com`` matches itself; ``*.example.com`` matches
    exactly one extra left-most label (``mx1.example.com``, not ``a.b.example.com`` nor
    ``example.com``).  Case-insensitive, trailing dots ignored."""
    pattern = pattern.strip().rstrip(".").lower()
    host = host.strip().rstrip(".").lower()
    if not pattern or not host:
        return False
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return host == pattern


def parse_txt(strings: list[str]) -> str:
    """The policy id from the ``_mta-sts`` TXT records; raise :class:`MtaStsError` unless
    exactly one record starts with ``v=STSv1`` and has a valid ``id``."""
    records = [s for s in strings if s.startswith("v=STSv1")]
    if not records:
        raise MtaStsError("no v=STSv1 TXT record")
    if len(records) > 1:
        raise MtaStsError("more than one v=STSv1 TXT record (RFC 8461: no policy)")
    fields = {}
    for part in records[0].split(";"):
        key, _, value = part.strip().partition("=")
        if key:
            fields[key.strip()] = value.strip()
    policy_id = fields.get("id", "")
    if not _ID.match(policy_id):
        raise MtaStsError(f"TXT record without a valid id: {records[0]!r}")
    return policy_id


def parse_policy(domain: str, policy_id: str, text: str) -> MtaStsPolicy:
    """Parse a policy body (``key: value`` lines, CRLF or LF); unknown keys are ignored."""
    values: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise MtaStsError(f"policy line without ':': {line[:80]!r}")
        values.setdefault(key.strip().lower(), []).append(value.strip())
    if values.get("version") != ["STSv1"]:
        raise MtaStsError(f"policy version must be STSv1, got {values.get('version')}")
    mode = (values.get("mode") or [""])[0]
    if len(values.get("mode", [])) != 1 or mode not in MODES:
        raise MtaStsError(f"policy mode must be one of {', '.join(MODES)}, got {mode!r}")
    max_age_text = (values.get("max_age") or [""])[0]
    if len(values.get("max_age", [])) != 1 or not re.fullmatch(r"\d{1,10}", max_age_text):
        raise MtaStsError(f"policy max_age must be a number of seconds, got {max_age_text!r}")
    mx = tuple(m.lower().rstrip(".") for m in values.get("mx", []) if m)
    if mode != "none" and not mx:
        raise MtaStsError(f"a policy in mode {mode} must list at least one mx")
    return MtaStsPolicy(domain, policy_id, mode, mx, min(int(max_age_text), MAX_AGE_LIMIT))


# --- fetching -------------------------------------------------------------------------------


async def fetch_policy_text(
    host: str,
    address: str,
    port: int,
    context: ssl.SSLContext,
    timeout: float,
    limit: int = MAX_POLICY_BYTES,
) -> str:
    """GET the policy over HTTPS from ``address`` presenting and verifying ``host``.

    A tiny HTTP/1.1 client on purpose: it connects to the address our resolver found (the
    system resolver may not know the test zones), follows no redirect, and reads at most
    ``limit`` bytes within ``timeout`` seconds in total.
    """
    try:
        return await asyncio.wait_for(_get(host, address, port, context, limit), timeout=timeout)
    except TimeoutError:
        raise MtaStsError(f"fetching https://{host}:{port}{POLICY_PATH} timed out") from None
    except ssl.SSLCertVerificationError as exc:
        raise MtaStsError(f"https://{host}: certificate not valid: {exc.verify_message}") from None
    except (OSError, ssl.SSLError) as exc:
        raise MtaStsError(f"https://{host}:{port}: {exc}") from None


async def _get(host: str, address: str, port: int, context: ssl.SSLContext, limit: int) -> str:
    reader, writer = await asyncio.open_connection(address, port, ssl=context, server_hostname=host)
    try:
        request = (
            f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: smg-mta-sts\r\n"
            "Accept: text/plain\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        cap = limit + 16384  # the body plus room for the headers
        raw = b""
        while len(raw) <= cap:  # bounded by cap, and by the caller's timeout
            chunk = await reader.read(cap + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
        if len(raw) > cap:
            raise MtaStsError(f"https://{host}{POLICY_PATH}: response larger than {cap} bytes")
    finally:
        # Abort rather than close: a TLS close waits for the peer, and a stalled peer must not
        # stretch the caller's timeout.
        writer.transport.abort()
    return _parse_response(host, raw, limit)


def _parse_response(host: str, raw: bytes, limit: int) -> str:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise MtaStsError(f"https://{host}: no complete HTTP response")
    lines = head.decode("iso-8859-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/"):
        raise MtaStsError(f"https://{host}: not an HTTP response: {lines[0][:80]!r}")
    if status[1] != "200":
        # RFC 8461 section 3.3: redirects are not followed; any other status is a failure.
        raise MtaStsError(f"https://{host}{POLICY_PATH}: HTTP {' '.join(status[1:])}")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(host, body)
    elif "content-length" in headers and headers["content-length"].isdigit():
        body = body[: int(headers["content-length"])]
    if len(body) > limit:
        raise MtaStsError(f"https://{host}{POLICY_PATH}: policy larger than {limit} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise MtaStsError(f"https://{host}{POLICY_PATH}: policy is not UTF-8") from None


def _dechunk(host: str, body: bytes) -> bytes:
    out = b""
    for _ in range(10000):  # bounded: a policy has few chunks
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        try:
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
        except ValueError:
            raise MtaStsError(f"https://{host}: bad chunked encoding") from None
        if size == 0:
            return out
        out += rest[:size]
        body = rest[size + 2 :]
    raise MtaStsError(f"https://{host}: truncated chunked body")


# --- the cache ------------------------------------------------------------------------------


class MtaSts:
    """``await mta_sts.policy(domain) -> MtaStsPolicy | None`` with the RFC's caching."""

    def __init__(
        self,
        section: MtaStsSection,
        resolver: Resolver,
        clock: Callable[[], float] = time.time,
        max_domains: int = MAX_CACHED_DOMAINS,
        state: StateFile | None = None,
    ) -> None:
        self.section = section
        self.resolver = resolver
        self._clock = clock
        self.max_domains = max_domains
        self.state = state
        self._cache: OrderedDict[str, MtaStsPolicy] = OrderedDict()
        # domain -> (policy id, when) of the last failed fetch: not fetched again for a while
        self._failed: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._in_flight: dict[str, asyncio.Future[MtaStsPolicy | None]] = {}
        self._context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            cafile = str(self.section.ca_bundle) if self.section.ca_bundle else None
            ctx = ssl.create_default_context(cafile=cafile)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._context = ctx
        return self._context

    def adopt(self, previous: MtaSts) -> None:
        """Take over another instance's cached policies (a config reload)."""
        self._cache = previous._cache
        self._failed = previous._failed

    def cached(self, domain: str) -> MtaStsPolicy | None:
        """The cached, unexpired policy of ``domain``, if any."""
        if self.state is not None and self.state.changed():
            self._load_shared(self.state.load())
        policy = self._cache.get(domain)
        if policy is not None and policy.expired(self._clock()):
            del self._cache[domain]
            return None
        return policy

    async def policy(self, domain: str) -> MtaStsPolicy | None:
        """The policy in force for ``domain`` (None: the domain has none)."""
        task = self._in_flight.get(domain)
        if task is None:  # one discovery per domain at a time; the others share its result
            task = asyncio.ensure_future(self._policy(domain))
            self._in_flight[domain] = task
            task.add_done_callback(lambda _: self._in_flight.pop(domain, None))
        return await asyncio.shield(task)

    async def _policy(self, domain: str) -> MtaStsPolicy | None:
        cached = self.cached(domain)
        try:
            policy_id = await self.discover(domain)
        except MtaStsError as exc:
            if cached is not None:
                log.info(
                    "mta-sts %s: %s; using the cached policy id=%s", domain, exc, cached.policy_id
                )
            return cached
        if cached is not None and cached.policy_id == policy_id:
            return cached
        failed = self._failed.get(domain)
        if failed and failed[0] == policy_id and self._clock() - failed[1] < REFETCH_AFTER_FAILURE:
            return cached  # this id failed a moment ago: do not stall every delivery on it
        try:
            policy = await self.fetch(domain, policy_id)
        except MtaStsError as exc:
            self._remember(self._failed, domain, (policy_id, self._clock()))
            if cached is not None:
                log.warning(
                    "mta-sts %s: refresh failed (%s); keeping the cached policy id=%s",
                    domain,
                    exc,
                    cached.policy_id,
                )
            else:
                log.warning(
                    "mta-sts %s: TXT id=%s but no usable policy: %s", domain, policy_id, exc
                )
            return cached
        self._failed.pop(domain, None)
        self._remember(self._cache, domain, policy)
        if self.state is not None:
            self._load_shared(self.state.update(lambda table: self._share(table, policy)))
        log.info(
            "mta-sts %s: policy id=%s mode=%s mx=%s max_age=%d",
            domain,
            policy.policy_id,
            policy.mode,
            ",".join(policy.mx),
            policy.max_age,
        )
        return policy

    def _share(self, table: dict[str, Any], policy: MtaStsPolicy) -> None:
        """Add ``policy`` to the shared table, dropping expired and the oldest entries."""
        now = self._clock()
        table.pop(policy.domain, None)
        table[policy.domain] = {
            "id": policy.policy_id,
            "mode": policy.mode,
            "mx": list(policy.mx),
            "max_age": policy.max_age,
            "fetched_at": policy.fetched_at,
        }
        for domain in [d for d, p in table.items() if now >= p["fetched_at"] + p["max_age"]]:
            del table[domain]
        for domain in list(table)[: max(0, len(table) - self.max_domains)]:
            del table[domain]

    def _load_shared(self, table: dict[str, Any] | None) -> None:
        for domain, entry in (table or {}).items():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                policy = MtaStsPolicy(
                    domain,
                    str(entry["id"]),
                    str(entry["mode"]),
                    tuple(str(m) for m in entry["mx"]),
                    int(entry["max_age"]),
                    float(entry["fetched_at"]),
                )
                mine = self._cache.get(domain)
                if mine is None or mine.fetched_at < policy.fetched_at:
                    self._remember(self._cache, domain, policy)

    def _remember(self, table: OrderedDict[str, Any], domain: str, value: Any) -> None:
        table.pop(domain, None)
        table[domain] = value
        while len(table) > self.max_domains:
            table.popitem(last=False)

    async def discover(self, domain: str) -> str:
        """The policy id from ``_mta-sts.<domain>`` TXT, or :class:`MtaStsError`."""
        result = await self.resolver.query(f"_mta-sts.{domain}", "TXT")
        if result.status != "ok":
            raise MtaStsError(f"_mta-sts.{domain} TXT: {result.status}")
        strings = [b"".join(record.strings).decode("utf-8", "replace") for record in result.records]
        return parse_txt(strings)

    async def fetch(self, domain: str, policy_id: str) -> MtaStsPolicy:
        host = f"mta-sts.{domain}"
        result = await self.resolver.addresses(host)
        addresses = [r.address for r in result.records] if result.status == "ok" else []
        if not addresses:
            raise MtaStsError(f"{host} has no address ({result.status})")
        # Only public addresses (or dns.extra_public_networks): a domain must not make us
        # fetch from hosts inside our own networks (SSRF).
        public = [address for address in addresses if self.resolver.is_public(address)]
        if not public:
            raise MtaStsError(
                f"{host} has only addresses that are not public ({', '.join(addresses)}): "
                "not fetched"
            )
        addresses = public
        text = await fetch_policy_text(
            host, addresses[0], self.section.https_port, self.context(), self.section.fetch_timeout
        )
        policy = parse_policy(domain, policy_id, text)
        return MtaStsPolicy(
            policy.domain, policy.policy_id, policy.mode, policy.mx, policy.max_age, self._clock()
        )
