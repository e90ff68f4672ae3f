"""The deployed lab fleet as the acceptance tests see it: the customer sends (swaks or raw SMTP
from its namespace), the gateways are asked over SSH (testinfra hosts from tests/infra), the far
ends and the customer's own mail server are read from their Maildirs.

Every wait here is bounded; every test uses its own tag (Message-ID and recipient local part),
so tests never confuse each other's mail.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fleet import mail
from bench.fleet.arrivals import Arrival, Arrivals
from bench.fleet.smtp import RawSmtp, banner_from

SMG = "/opt/smg/venv/bin/smg"
CONFIG = "/etc/smg/smg.toml"
RELAY_UNIT = "smg.service"


class LabTimeout(AssertionError):
    pass


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Bounded poll: the first truthy value of ``check()``, or LabTimeout naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise LabTimeout(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class Swaks:
    returncode: int
    transcript: str

    def said(self, text: str) -> bool:
        """The server sent a reply line containing ``text``."""
        return any(text in line for line in self.transcript.splitlines() if line.startswith("<"))

    @property
    def accepted(self) -> bool:
        return self.returncode == 0 and self.said("250 2.0.0")


class Gateway:
    """One gateway host: SSH commands (via a testinfra host), its relay and its queue."""

    def __init__(self, name: str, facts: dict[str, Any], host: Any) -> None:
        self.name, self.address, self.role = name, facts["address"], facts["role"]
        self.fqdn = facts["fqdn"]
        # Behind the lab's NAT the relay listens on the private address (docs/deploy.md).
        self.listen_address = facts.get("private_address") or self.address
        self.host = host

    def __repr__(self) -> str:
        return f"Gateway({self.name} {self.address} {self.role})"

    def run(self, command: str, timeout: int = 60) -> Any:
        """``command`` in a shell on the host, killed after ``timeout`` s (a hung SSH command
        must not hang the suite)."""
        return self.host.run(f"timeout {timeout} sh -c {shlex.quote(command)}")

    def check(self, command: str, timeout: int = 60) -> str:
        result = self.run(command, timeout)
        assert result.rc == 0, f"{self.name}: {command}: rc={result.rc}\n{result.stderr}"
        return result.stdout

    def smg(self, args: str, timeout: int = 60) -> Any:
        """``smg ARGS`` as the relay's user (the spool and state belong to it)."""
        return self.run(f"runuser -u smg -- {SMG} {args}", timeout)

    # --- the queue ------------------------------------------------------------------------

    def queue(self) -> list[dict[str, Any]]:
        result = self.smg(f"queue list --json --config {CONFIG}")
        assert result.rc == 0, f"{self.name}: smg queue list: {result.stderr}"
        return json.loads(result.stdout or "[]")

    def queued_for(self, recipient: str) -> list[dict[str, Any]]:
        return [m for m in self.queue() if any(r["address"] == recipient for r in m["recipients"])]

    def flush(self) -> None:
        result = self.smg(f"queue flush --config {CONFIG}")
        assert result.rc == 0, f"{self.name}: smg queue flush: {result.stderr}"

    def release(self, queue_id: str) -> str:
        result = self.smg(f"queue release {queue_id} --config {CONFIG}")
        assert result.rc == 0, f"{self.name}: smg queue release: {result.stderr}"
        return result.stdout

    # --- services ---------------------------------------------------------------------------

    def is_active(self, unit: str) -> bool:
        return self.run(f"systemctl is-active {unit}").stdout.strip() == "active"

    def inactive(self, units: tuple[str, ...]) -> list[str]:
        """The units of ``units`` that are not active (one SSH round trip)."""
        states = self.run(f"systemctl is-active {' '.join(units)}").stdout.split()
        if len(states) != len(units):  # an SSH hiccup: ask one by one
            return [u for u in units if not self.is_active(u)]
        return [u for u, state in zip(units, states, strict=True) if state != "active"]

    def forget_dns(self, zone: str) -> None:
        """Drop ``zone``'s answers from the host's own resolver (unbound caches them for their
        TTL): a test that edits a zone, such as a DNSBL delisting, sees the change at once."""
        self.check(f"! systemctl is-active -q unbound || unbound-control flush_zone {zone}")

    def systemctl(self, action: str, unit: str, timeout: int = 120) -> None:
        self.check(f"systemctl {action} {unit}", timeout)

    def restarts(self, unit: str = RELAY_UNIT) -> int:
        return int(self.check(f"systemctl show -p NRestarts --value {unit}").strip() or 0)

    def main_pid(self, unit: str = RELAY_UNIT) -> int:
        return int(self.check(f"systemctl show -p MainPID --value {unit}").strip() or 0)

    def listening(self, port: int = 25) -> bool:
        """The relay listens on the host's public address (seen on the host: for the bad
        gateway, which takes no SMTP from the customer host). ``active`` is not enough:
        systemd calls smg active when it starts, seconds before it listens."""
        out = self.run(f"ss -Hltn 'sport = :{port}'").stdout
        return f"{self.listen_address}:{port}" in out

    def smtp_ready(self, netns: str) -> bool:
        return banner_from(netns, self.address, timeout=3).startswith("220")

    def wait_active(self, unit: str, timeout: float = 60) -> None:
        wait_for(f"{unit} active on {self.name}", lambda: self.is_active(unit), timeout, 1)

    def journal(self, unit: str = RELAY_UNIT, lines: int = 40) -> str:
        text = self.run(f"journalctl -u {unit} -n {lines * 2} --no-pager -o cat").stdout
        # systemd in a container without its own cgroup tree repeats these: noise here.
        useful = [line for line in text.splitlines() if "cgroup" not in line]
        return "\n".join(useful[-lines:])


class Fleet:
    """The lab fleet after the deploy (``state`` is lab/run/state.json)."""

    def __init__(
        self, state: dict[str, Any], lab_host: Callable[[str], Any], customer_maildir: Path
    ) -> None:
        self.state = state
        self.gateways = {
            name: Gateway(name, facts, lab_host(name)) for name, facts in state["hosts"].items()
        }
        self.netns = state["customer"]["netns"]
        # The other customer hosts (tenants, issue 11): customer-b, customer-c, stranger.
        self.customer_hosts = {
            "customer": state["customer"], **state.get("customers", {})
        }  # fmt: skip
        self.customer_address = state["customer"]["address"]
        self.dns_server = f"{state['dns']['address']}:{state['dns']['port']}"
        boxes = {n: Path(f["mail_dir"]) / "maildir" for n, f in state["far_ends"].items()}
        boxes["customer"] = customer_maildir
        self.mailboxes = Arrivals(boxes)

    # --- who is who -------------------------------------------------------------------------

    @property
    def good(self) -> list[Gateway]:
        return [g for g in self.gateways.values() if g.role == "good"]

    @property
    def bads(self) -> list[Gateway]:
        """Every bad gateway (the lab has two: otc-de-mta03, and otc-de-mta04 behind NAT)."""
        return [g for g in self.gateways.values() if g.role == "bad"]

    @property
    def bad(self) -> Gateway:
        """The first bad gateway, otc-de-mta03 (the one of the service description)."""
        return self.bads[0]

    @property
    def bad_ips(self) -> set[str]:
        """The bad gateways' public addresses: what the far ends see of spam."""
        return {g.address for g in self.bads}

    @property
    def good_ips(self) -> set[str]:
        return {g.address for g in self.good}

    def far_end_ns(self, name: str) -> str:
        return self.state["far_ends"][name]["netns"]

    # --- sending from the customer host -----------------------------------------------------

    def swaks(
        self,
        gateway: Gateway,
        mail_from: str,
        rcpts: str | list[str],
        data: bytes | None = None,
        *,
        extra: list[str] | None = None,
        timeout: float = 60,
        source: str | None = None,
    ) -> Swaks:
        """swaks run on a customer host (``ip netns exec``), as the customer's MTA would: by
        default the host of the sender's customer (customer-b.example: customer-b's host, the
        rest: the customer host of customer-a); ``source`` names another (test_tenants)."""
        to = rcpts if isinstance(rcpts, str) else ",".join(rcpts)
        host = source or self.source_for(mail_from)
        netns = self.customer_hosts[host]["netns"]
        ehlo = "mail.customer-a.example" if host == "customer" else f"{host}.lab.example"
        argv = [
            "ip", "netns", "exec", netns, "swaks", "--server", gateway.address,
            "--ehlo", ehlo, "--from", mail_from, "--to", to,
            "--timeout", str(int(timeout) - 5), *(extra or []),
        ]  # fmt: skip
        if data is not None:
            argv += ["--data", "-"]
        proc = subprocess.run(argv, input=data, capture_output=True, timeout=timeout, check=False)
        return Swaks(proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace"))

    def source_for(self, mail_from: str) -> str:
        """The customer host a sender's mail comes from (its customer's network)."""
        if (
            mail_from.lower().endswith("@customer-b.example")
            and "customer-b" in self.customer_hosts
        ):
            return "customer-b"
        return "customer"

    def raw(self, gateway: Gateway, timeout: float = 15, source: str = "customer") -> RawSmtp:
        return RawSmtp(self.customer_hosts[source]["netns"], gateway.address, timeout=timeout)

    def send(self, gateway: Gateway, kind: str, tag: str, mail_from: str, rcpt: str) -> Swaks:
        return self.swaks(gateway, mail_from, rcpt, mail.build(kind, tag, mail_from, rcpt))

    # --- what arrived -----------------------------------------------------------------------

    def arrived(self, tag: str, count: int = 1, timeout: float = 60) -> list[Arrival]:
        """The copies of ``tag`` at the far ends and the customer's server, once ``count``."""

        def found() -> list[Arrival]:
            copies = self.mailboxes.tagged(tag)
            return copies if len(copies) >= count else []

        try:
            return wait_for(f"{count} message(s) tagged {tag}", found, timeout, 0.25)
        except LabTimeout as exc:
            raise LabTimeout(f"{exc}\n{self.diagnostics()}") from None

    def arrivals(self, match: Callable[[Arrival], bool]) -> list[Arrival]:
        return self.mailboxes.matching(match)

    def wait_arrival(
        self, what: str, match: Callable[[Arrival], bool], timeout: float = 60
    ) -> Arrival:
        try:
            found = wait_for(what, lambda: self.mailboxes.matching(match), timeout, 0.25)
        except LabTimeout as exc:
            raise LabTimeout(f"{exc}\n{self.diagnostics()}") from None
        return found[0]

    def diagnostics(self) -> str:
        """The relays' last log lines and queues, for a failure message."""
        parts = []
        for gateway in self.gateways.values():
            try:
                queue = gateway.smg(f"queue list --config {CONFIG}").stdout
                parts.append(f"--- {gateway.name} queue ---\n{queue[-1500:]}")
                parts.append(f"--- {gateway.name} journal ---\n{gateway.journal(lines=15)}")
            except Exception as exc:  # diagnostics must never hide the real failure
                parts.append(f"--- {gateway.name}: {exc!r}")
        return "\n".join(parts)


# --- faults the lab can inject ----------------------------------------------------------------


_lock_depth = 0


@contextmanager
def lab_locked() -> Iterator[None]:
    """The lab's lock (``python -m lab up``/``down`` wait for it), re-entrant in this process:
    a fault inside another fault (a host restart while a far end is down) takes it once."""
    global _lock_depth
    from lab import fleet as lab_fleet

    if _lock_depth:
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    with lab_fleet.locked():
        _lock_depth = 1
        try:
            yield
        finally:
            _lock_depth = 0


def restart_gateway_host(name: str, timeout: float = 120) -> float:
    """Reboot the gateway host ``name`` (``systemctl reboot`` inside it) and boot it again:
    systemd-nspawn ends when its container reboots, so the lab starts it again on the same
    root (overlay, address and host keys stay). Holds the lab's lock meanwhile, so no
    concurrent ``python -m lab up``/``down`` sees a half-restarted fleet. Returns the seconds
    from the reboot request to sshd answering again."""
    from lab import hosts as lab_hosts
    from lab.config import host_by_name
    from lab.proc import daemon_pid

    host = host_by_name(name)
    daemon = lab_hosts.daemon_name(host)
    started = time.monotonic()
    with lab_locked():
        old = daemon_pid(daemon)
        assert old is not None, f"{name} is not running"
        lab_hosts.in_host(host, ["systemctl", "reboot"], timeout=30)
        wait_for(f"{name} to go down", lambda: daemon_pid(daemon) is None, timeout, 0.2)
        lab_hosts.boot(host)
        lab_hosts.wait_ready(host, timeout=timeout)
    return time.monotonic() - started


@contextmanager
def gateway_host_down(name: str, timeout: float = 120) -> Iterator[None]:
    """The gateway host ``name`` powered off (``systemctl poweroff`` inside it) for the
    ``with`` block, then booted again on the same root (overlay, address, host keys stay), as
    :func:`restart_gateway_host` does; the lab's lock is held meanwhile."""
    from lab import hosts as lab_hosts
    from lab.config import host_by_name
    from lab.proc import daemon_pid

    host = host_by_name(name)
    daemon = lab_hosts.daemon_name(host)
    with lab_locked():
        assert daemon_pid(daemon) is not None, f"{name} is not running"
        lab_hosts.in_host(host, ["systemctl", "poweroff"], timeout=30)
        wait_for(f"{name} to go down", lambda: daemon_pid(daemon) is None, timeout, 0.2)
        try:
            yield
        finally:
            lab_hosts.boot(host)
            lab_hosts.wait_ready(host, timeout=timeout)


# --- figures measured by the tests (printed at the end of the run, see conftest) --------------

FIGURES: dict[str, Any] = {}


def record(name: str, value: Any) -> None:
    """Keep a measured figure (seconds, counts, a load summary) for the run's summary."""
    FIGURES[name] = value
