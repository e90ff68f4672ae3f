"""Load through the lab fleet: mixed mail from the customer host, checked at the far ends.

    .venv/bin/python -m bench.fleet.load [--messages 3000] [--connections 16]
        [--mix ham=80,spam=15,virus=5] [--gateways otc-de-mta01,otc-de-mta02]
        [--send-timeout 900] [--arrival-timeout 300] [--out FILE.json]

The customer host (netns ``smglab-customer``) sends over ``--connections`` SMTP sessions to the
good gateways (each session keeps to one gateway and moves to the next one if its gateway fails,
as a customer MTA with two MX hosts does; a 4xx is retried with a bounded backoff). Each message
is unique (its tag is in the Message-ID). Ham goes to partner-tls.example and
partner-plain.example, spam the same (it must leave via the bad gateway), viruses must be
refused with 554.

Measured: accepted msg/s (first send to last 250), end-to-end msg/s (first send to the last
arrival at a far end), latency of the reply to the final dot (p50/p90/p99/max). Checked: every
message that got a 250 arrives (missing = lost), duplicates, the gateway IP that delivered
(ham from a good gateway, spam from the bad one), no verdict header outside the fleet,
nothing in clear text for a pair with a forced-TLS rule, one NDR per refused virus at the
customer's mail server. Exit 0 when all checks hold, 1 otherwise, 2 if the lab is not up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.fleet import mail
from bench.fleet.arrivals import Arrival, Arrivals, lab_maildirs
from bench.fleet.smtp import AsyncSmtp, SmtpSessionError

REPO = Path(__file__).resolve().parents[2]
STATE_FILE = REPO / "lab" / "run" / "state.json"
RESULTS_DIR = REPO / "bench" / "results"
DEFAULT_RECIPIENTS = ("load@partner-tls.example", "load@partner-plain.example")
# The lab inventory's forced-TLS rules (inventories/lab.py): (sender domain, recipient domain).
FORCED_TLS_PAIRS = {("customer-a.example", "partner-tls.example")}


@dataclass
class LoadPlan:
    messages: int = 3000
    connections: int = 16
    mix: dict[str, int] = field(default_factory=lambda: {"ham": 80, "spam": 15, "virus": 5})
    gateways: list[str] = field(default_factory=list)  # addresses of the gateways to send to
    netns: str = "smglab-customer"
    sender_domain: str = "customer-a.example"
    recipients: tuple[str, ...] = DEFAULT_RECIPIENTS
    per_session: int = 200  # transactions per SMTP session, then a new session
    retries: int = 8  # per message, after a 4xx or a broken session
    send_timeout: float = 900.0  # the whole sending phase
    arrival_timeout: float = 300.0  # waiting for the far ends after the last 250
    ehlo: str = "mail.customer-a.example"
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    seed: int = 7

    @property
    def sender(self) -> str:
        # One address per run: the NDRs for this run's viruses come back to it.
        return f"load-{self.run_id}@{self.sender_domain}"


@dataclass
class Sent:
    tag: str
    kind: str
    rcpt: str
    gateway: str = ""
    result: str = "unsent"  # accepted | rejected | tempfail | error | unsent
    reply: str = ""
    latency: float | None = None  # final dot -> reply, seconds (accepted only)
    attempts: int = 0
    accepted_at: float | None = None  # time.time() of the 250


def kinds_for(plan: LoadPlan) -> list[str]:
    """``plan.messages`` kinds in the proportions of ``plan.mix``, shuffled (seeded)."""
    total = sum(plan.mix.values())
    kinds: list[str] = []
    for kind, weight in plan.mix.items():
        kinds += [kind] * round(plan.messages * weight / total)
    kinds = (kinds + ["ham"] * plan.messages)[: plan.messages]
    random.Random(plan.seed).shuffle(kinds)
    return kinds


def make_jobs(plan: LoadPlan) -> list[Sent]:
    return [
        Sent(tag=f"load-{plan.run_id}-{i:05d}-{kind}", kind=kind, rcpt=plan.recipients[i % 2])
        for i, kind in enumerate(kinds_for(plan))
    ]


class _Sender:
    """One SMTP client of the customer's MTA: a session to one gateway at a time."""

    def __init__(self, number: int, plan: LoadPlan) -> None:
        self.plan = plan
        self.gateway_index = number % len(plan.gateways)
        self.session: AsyncSmtp | None = None
        self.used = 0

    @property
    def gateway(self) -> str:
        return self.plan.gateways[self.gateway_index]

    async def _session(self) -> AsyncSmtp:
        if self.session is not None and self.used >= self.plan.per_session:
            await self.close()
        if self.session is None:
            self.session = await AsyncSmtp.connect(
                self.plan.netns, self.gateway, ehlo=self.plan.ehlo, timeout=60
            )
            self.used = 0
        self.used += 1
        return self.session

    async def attempt(self, job: Sent) -> bool:
        """One try; True when the message's fate is decided (250 or 5xx)."""
        job.attempts += 1
        try:
            session = await self._session()
            data = mail.build(job.kind, job.tag, self.plan.sender, job.rcpt)
            outcome = await session.send(self.plan.sender, [job.rcpt], data)
        except SmtpSessionError as exc:
            # The gateway went away mid-session: the next one, as MX failover does. The
            # message may have been queued before the connection broke: a duplicate, not a loss.
            job.result, job.reply = "error", str(exc)
            self.session = None
            self.gateway_index = (self.gateway_index + 1) % len(self.plan.gateways)
            return False
        job.gateway, job.reply = self.gateway, str(outcome.reply)
        if outcome.reply.code == 250 and outcome.stage == "dot":
            job.result, job.latency, job.accepted_at = "accepted", outcome.latency, time.time()
            return True
        if outcome.reply.code >= 500:
            job.result = "rejected"
            return True
        job.result = "tempfail"  # 4xx: try again later, as an MTA does
        if outcome.reply.code == 421:
            await self.close()
        return False

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        self.session = None


async def _worker(number: int, plan: LoadPlan, queue: asyncio.Queue[Sent], deadline: float) -> None:
    sender = _Sender(number, plan)
    try:
        while time.monotonic() < deadline and not queue.empty():
            job = queue.get_nowait()
            backoff = 0.5
            while job.attempts <= plan.retries and time.monotonic() < deadline:
                if await sender.attempt(job):
                    break
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
    finally:
        await sender.close()


async def send_all(plan: LoadPlan, jobs: list[Sent], progress: bool = False) -> float:
    """Send every job; returns the seconds the sending took."""
    queue: asyncio.Queue[Sent] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    started = time.monotonic()
    deadline = started + plan.send_timeout
    workers = [
        asyncio.create_task(_worker(n, plan, queue, deadline)) for n in range(plan.connections)
    ]
    reporter = asyncio.create_task(_report_progress(jobs, started)) if progress else None
    await asyncio.gather(*workers)
    if reporter is not None:
        reporter.cancel()
    return time.monotonic() - started


async def _report_progress(jobs: list[Sent], started: float) -> None:
    while True:
        await asyncio.sleep(5)
        done = Counter(j.result for j in jobs)
        elapsed = time.monotonic() - started
        print(f"  {elapsed:6.1f} s  {dict(done)}", file=sys.stderr, flush=True)


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


@dataclass
class Verdict:
    missing: list[str] = field(default_factory=list)  # got a 250, never arrived
    duplicates: dict[str, int] = field(default_factory=dict)  # arrived more than once
    wrong_ip: list[str] = field(default_factory=list)  # ham not from a good, spam not from bad
    verdict_header: list[str] = field(default_factory=list)  # X-SMG-Verdict left the fleet
    cleartext: list[str] = field(default_factory=list)  # forced-TLS pair arrived in clear
    unexpected: list[str] = field(default_factory=list)  # refused (5xx) but arrived anyway
    ndrs_expected: int = 0
    ndrs_received: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.wrong_ip or self.verdict_header or self.cleartext
            or self.unexpected or self.ndrs_received < self.ndrs_expected
        )  # fmt: skip


def check_arrivals(
    jobs: list[Sent], arrivals: Arrivals, good_ips: set[str], bad_ips: set[str], sender: str
) -> Verdict:
    verdict = Verdict()
    arrivals.refresh()
    for job in jobs:
        copies = [a for a in arrivals.by_tag.get(job.tag, []) if a.server != "customer"]
        if job.result == "rejected" and copies:
            verdict.unexpected.append(job.tag)
        if job.result == "accepted" and not copies:
            verdict.missing.append(job.tag)
        if len(copies) > 1:
            verdict.duplicates[job.tag] = len(copies)
        for copy in copies:
            _check_copy(verdict, job, copy, good_ips, bad_ips, sender)
    verdict.ndrs_expected = sum(1 for j in jobs if j.kind == "virus" and j.reply.startswith("554"))
    verdict.ndrs_received = len(
        arrivals.matching(lambda a: a.server == "customer" and a.recipient == sender)
    )
    return verdict


def _check_copy(
    verdict: Verdict, job: Sent, copy: Arrival, good: set[str], bad: set[str], sender: str
) -> None:
    expected_ips = bad if job.kind == "spam" else good
    if copy.client_address not in expected_ips:
        verdict.wrong_ip.append(f"{job.tag} from {copy.client_address}")
    if copy.has_verdict_header:
        verdict.verdict_header.append(job.tag)
    pair = (sender.rpartition("@")[2], job.rcpt.rpartition("@")[2])
    if pair in FORCED_TLS_PAIRS and copy.tls_protocol is None:
        verdict.cleartext.append(job.tag)


def summarise(
    plan: LoadPlan, jobs: list[Sent], send_seconds: float, verdict: Verdict, arrivals: Arrivals,
    started_at: float,
) -> dict[str, Any]:  # fmt: skip
    accepted = [j for j in jobs if j.result == "accepted"]
    latencies = [j.latency for j in accepted if j.latency is not None]
    delivered = [
        a for j in accepted for a in arrivals.by_tag.get(j.tag, []) if a.server != "customer"
    ]
    last_arrival = max((a.path.stat().st_mtime for a in delivered), default=started_at)
    end_to_end = max(last_arrival - started_at, 1e-6)
    last_250 = max((j.accepted_at or 0 for j in accepted), default=started_at)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    return {
        "plan": {k: v for k, v in asdict(plan).items() if k != "recipients"},
        # The machine is shared: the figures only mean something next to its load.
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "sent": len(jobs),
        "results": dict(Counter(j.result for j in jobs)),
        "by_kind": {
            kind: dict(Counter(j.result for j in jobs if j.kind == kind)) for kind in plan.mix
        },
        "by_gateway": dict(Counter(j.gateway for j in accepted)),
        "retried": sum(1 for j in jobs if j.attempts > 1),
        "send_seconds": round(send_seconds, 2),
        "accepted_per_second": round(len(accepted) / max(last_250 - started_at, 1e-6), 1),
        "end_to_end_seconds": round(end_to_end, 2),
        "delivered": len({a.tag for a in delivered}),
        "delivered_per_second": round(len({a.tag for a in delivered}) / end_to_end, 1),
        "latency_ms": {
            "p50": ms(percentile(latencies, 50)),
            "p90": ms(percentile(latencies, 90)),
            "p99": ms(percentile(latencies, 99)),
            "max": ms(max(latencies, default=None)),
            "mean": ms(statistics.fmean(latencies)) if latencies else None,
        },
        "checks": {
            "ok": verdict.ok,
            "missing": len(verdict.missing),
            "duplicates": len(verdict.duplicates),
            "wrong_ip": len(verdict.wrong_ip),
            "verdict_header_leaked": len(verdict.verdict_header),
            "cleartext_under_rule": len(verdict.cleartext),
            "refused_but_arrived": len(verdict.unexpected),
            "ndrs_expected": verdict.ndrs_expected,
            "ndrs_received": verdict.ndrs_received,
        },
        "examples": {
            "missing": verdict.missing[:10],
            "wrong_ip": verdict.wrong_ip[:10],
            "duplicates": dict(list(verdict.duplicates.items())[:10]),
            "not_accepted": [
                f"{j.tag}: {j.result} {j.reply[:120]}"
                for j in jobs
                if j.result not in ("accepted",) and j.kind != "virus"
            ][:10],
        },
    }


@dataclass
class Fleet:
    """The lab as the load run needs it (from lab/run/state.json)."""

    state: dict[str, Any]

    @classmethod
    def load(cls, path: Path = STATE_FILE) -> Fleet:
        return cls(json.loads(path.read_text()))

    def addresses(self, role: str) -> set[str]:
        return {h["address"] for h in self.state["hosts"].values() if h["role"] == role}

    def address_of(self, name: str) -> str:
        return self.state["hosts"][name]["address"]

    @property
    def netns(self) -> str:
        return self.state["customer"]["netns"]

    @property
    def customer_address(self) -> str:
        return self.state["customer"]["address"]


class LoadRun:
    """One load run: ``send()`` (the jobs fill in as it goes; safe to watch from another
    thread), then ``check()`` waits for the far ends (bounded) and returns the summary."""

    def __init__(self, plan: LoadPlan, fleet: Fleet, customer_maildir: Path) -> None:
        self.plan, self.fleet = plan, fleet
        self.jobs = make_jobs(plan)
        self.arrivals = Arrivals(lab_maildirs(fleet.state, customer_maildir))
        self.arrivals.skip_existing()
        self.started_at = 0.0
        self.send_seconds = 0.0

    def accepted(self) -> int:
        return sum(1 for j in self.jobs if j.result == "accepted")

    def send(self, progress: bool = False) -> None:
        self.started_at = time.time()
        self.send_seconds = asyncio.run(send_all(self.plan, self.jobs, progress))

    def check(self) -> dict[str, Any]:
        plan, jobs = self.plan, self.jobs
        expected = {j.tag for j in jobs if j.result == "accepted"}
        self.arrivals.wait_for(expected, timeout=plan.arrival_timeout)
        ndrs = sum(1 for j in jobs if j.kind == "virus" and j.result == "rejected")
        self.arrivals.wait_until(
            lambda a: a.server == "customer" and a.recipient == plan.sender,
            ndrs,
            timeout=min(60.0, plan.arrival_timeout),
        )
        good, bad = self.fleet.addresses("good"), self.fleet.addresses("bad")
        verdict = check_arrivals(jobs, self.arrivals, good, bad, plan.sender)
        return summarise(plan, jobs, self.send_seconds, verdict, self.arrivals, self.started_at)


def run_load(
    plan: LoadPlan, fleet: Fleet, customer_maildir: Path, progress: bool = False
) -> dict[str, Any]:
    """Send, wait for the far ends (bounded), check; returns the summary (``checks.ok``)."""
    run = LoadRun(plan, fleet, customer_maildir)
    run.send(progress)
    return run.check()


def _mix(text: str) -> dict[str, int]:
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind not in mail.KINDS or not weight.isdigit():
            raise argparse.ArgumentTypeError(f"expected ham=N,spam=N,virus=N, got {text!r}")
        mix[kind] = int(weight)
    return mix


def main(argv: list[str] | None = None) -> int:
    from bench.fleet.sink import CustomerMailServer
    from bench.fleet.smtp import banner_from

    parser = argparse.ArgumentParser(prog="python -m bench.fleet.load", description=__doc__)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--mix", type=_mix, default={"ham": 80, "spam": 15, "virus": 5})
    parser.add_argument("--gateways", default="", help="names; default: every good gateway")
    parser.add_argument("--send-timeout", type=float, default=900)
    parser.add_argument("--arrival-timeout", type=float, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not STATE_FILE.is_file():
        print(f"{STATE_FILE} missing: the lab is not up (make lab-up deploy)", file=sys.stderr)
        return 2
    fleet = Fleet.load()
    names = args.gateways.split(",") if args.gateways else sorted(
        n for n, h in fleet.state["hosts"].items() if h["role"] == "good"
    )  # fmt: skip
    plan = LoadPlan(
        messages=args.messages, connections=args.connections, mix=args.mix,
        gateways=[fleet.address_of(n) for n in names], netns=fleet.netns,
        send_timeout=args.send_timeout, arrival_timeout=args.arrival_timeout,
    )  # fmt: skip
    workdir = REPO / "lab" / "run" / "acceptance" / "customer-mail"
    sink = CustomerMailServer(fleet.netns, fleet.customer_address, workdir)
    own_sink = not banner_from(fleet.netns, fleet.customer_address, timeout=2).startswith("220")
    if own_sink:
        sink.start()
    try:
        print(f"load {plan.run_id}: {plan.messages} messages, {plan.connections} connections, "
              f"mix {plan.mix}, via {', '.join(names)}", file=sys.stderr)  # fmt: skip
        summary = run_load(plan, fleet, sink.maildir, progress=True)
    finally:
        if own_sink:
            sink.stop()
    out = args.out or RESULTS_DIR / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}-{plan.run_id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"written: {out}")
    return 0 if summary["checks"]["ok"] else 1


def format_summary(s: dict[str, Any]) -> str:
    lat, checks = s["latency_ms"], s["checks"]
    return "\n".join(
        [
            f"sent {s['sent']}: {s['results']}  (retried {s['retried']})",
            f"by kind: {s['by_kind']}",
            f"by gateway (accepted): {s['by_gateway']}",
            f"accepted: {s['accepted_per_second']} msg/s over {s['send_seconds']} s",
            f"delivered: {s['delivered']} in {s['end_to_end_seconds']} s "
            f"= {s['delivered_per_second']} msg/s end to end",
            f"250 latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  "
            f"max {lat['max']}",
            f"checks: {checks}",
            f"load average at the end: {s['load_average']}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
