"""Relay bench: 5 KB messages over 16 connections through ``smg serve`` (durable queue) and,
in the same run, through Postfix configured by hand as a plain relay, both to the same kind of
sink.  Prints msg/s end to end and their ratio, p50/p99 of the 250 reply, CPU per message and
peak RSS of each MTA.

    python -m bench.relay [--messages 2000] [--connections 16] [--size 5000] [--rounds 2]
                          [--workers 1,2]

Needs root (Postfix's queue directories belong to the postfix user), knotd (the sender check
and the MX of the far domain) and Postfix 3.7; nothing else runs on the machine's daemons.

End to end = from the first message sent to the last one arriving at the sink, so it counts the
intake, the durable queue and delivery.  CPU = the MTA's processes only (Postfix: the master and
every child, including exited ones via the master's cumulative times), not the sink or the load.
Peak RSS = the largest sum of resident memory of the MTA's processes seen during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/relay/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import common
from bench.common import tree
from bench.postfix import PostfixRelay
from tests.harness.knot import KnotDNS
from tests.harness.util import free_port, tcp_connectable, terminate_pid, wait_for

SINK_IP, SMG_IP, POSTFIX_IP, DNS_IP, SOURCE_IP = (
    "127.0.25.10",
    "127.0.25.11",
    "127.0.25.12",
    "127.0.25.53",
    "127.0.25.5",
)
ZONES = {
    "bench-sender.test": "@ MX 10 mx\nmx A 127.0.25.20\n",
    "bench-far.test": f"@ MX 10 mx\nmx A {SINK_IP}\n",
}


class RssSampler(threading.Thread):
    """The peaks of the tree's summed RSS and PSS, sampled every 0.2 s."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak_rss = self.peak_pss = 0
        self._halt = threading.Event()

    def _sample(self) -> None:
        _, rss, pss = tree(self.root, pss=True)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def run(self) -> None:
        while not self._halt.wait(0.2):
            self._sample()

    def stop(self) -> tuple[int, int]:
        self._halt.set()
        self.join(5)
        self._sample()
        return self.peak_rss, self.peak_pss


# --- the pieces ------------------------------------------------------------------------------


def _tools(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.common", *args]


ROOT = Path(__file__).resolve().parents[2]


class Sink:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port(SINK_IP)
        self.state = workdir / "sink.state"
        self.proc = subprocess.Popen(
            _tools("sink", SINK_IP, str(self.port), str(self.state)), cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        wait_for(self.state.exists, 10, what="the sink")

    @property
    def endpoint(self) -> str:
        return f"{SINK_IP}:{self.port}"

    @property
    def cpu(self) -> float:
        return tree(self.proc.pid)[0]

    def read(self) -> tuple[int, float, float]:
        parts = self.state.read_text().split()
        return (int(parts[0]), float(parts[1]), float(parts[2])) if len(parts) == 3 else (0, 0, 0)

    def stop(self) -> None:
        terminate_pid(self.proc.pid, 10)


class SmgServe:
    def __init__(self, workdir: Path, sink: Sink, knot: KnotDNS, extra: dict[str, Any]) -> None:
        self.port = free_port(SMG_IP)
        self.config = workdir / "smg.toml"
        sections = smg_config(workdir, self.port, sink, knot)
        for section, values in extra.items():
            sections.setdefault(section, {}).update(values)
        self.config.write_text(_toml(sections))
        self.log = (workdir / "smg.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(lambda: tcp_connectable(SMG_IP, self.port), 30, what="smg serve")
        except TimeoutError:
            self.stop()
            log = (workdir / "smg.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"smg serve did not come up:\n{log}") from None

    @property
    def endpoint(self) -> str:
        return f"{SMG_IP}:{self.port}"

    def stop(self) -> None:
        terminate_pid(self.proc.pid, 40)
        self.log.close()


def smg_config(workdir: Path, port: int, sink: Sink, knot: KnotDNS) -> dict[str, dict[str, Any]]:
    return {
        "gateway": {
            "hostname": "smg-bench.example.net",
            "listen": [f"{SMG_IP}:{port}"],
            "spool": str(workdir / "spool"),
            "client_networks": ["127.0.0.0/8"],
            "source_address": SOURCE_IP,
        },
        "dns": {"nameservers": [knot.nameserver], "extra_public_networks": ["127.0.0.0/8"]},
        "delivery": {"port": sink.port, "max_connections_per_host": 16},
        "virus": {"enabled": False},
        "spam": {"enabled": False},
        "mta_sts": {"enabled": False},
    }


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


# --- one measurement -----------------------------------------------------------------------


@dataclass
class Result:
    stack: str
    messages: int
    failed: int
    msg_per_s: float
    accept_msg_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float
    peak_rss_mb: float
    peak_pss_mb: float
    failures: list[str]
    seconds: float = 0.0  # first message sent to the last at the sink
    cpu_mta_s: float = 0.0  # CPU seconds of each party over the run (cores = s / seconds)
    cpu_load_s: float = 0.0
    cpu_sink_s: float = 0.0


def run_load(endpoint: str, count: int, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return common.run_load(endpoint, count, args.connections, args.size, seed)


def measure(name: str, endpoint: str, sink: Sink, root_pid: int, args, seed: int) -> Result:
    warm = run_load(endpoint, args.warmup, args, seed)
    wait_for(lambda: sink.read()[0] >= warm["sent"], 120, interval=0.1, what="warm-up")
    base = sink.read()[0]
    cpu_before, sink_before = tree(root_pid)[0], sink.cpu
    sampler = RssSampler(root_pid)
    sampler.start()
    load = run_load(endpoint, args.messages, args, seed + 1)
    expected = base + load["sent"]
    wait_for(lambda: sink.read()[0] >= expected, 600, interval=0.05, what=f"{name} at the sink")
    last = sink.read()[2]
    cpu = tree(root_pid)[0] - cpu_before
    peak_rss, peak_pss = sampler.stop()
    sent = max(1, load["sent"])
    return Result(
        stack=name,
        messages=load["sent"],
        failed=load["failed"],
        msg_per_s=load["sent"] / (last - load["started"]),
        accept_msg_per_s=load["sent"] / load["seconds"],
        p50_ms=load["p50_ms"],
        p99_ms=load["p99_ms"],
        cpu_ms=1000 * cpu / sent,
        peak_rss_mb=peak_rss / 2**20,
        peak_pss_mb=peak_pss / 2**20,
        failures=load["failures"],
        seconds=last - load["started"],
        cpu_mta_s=cpu,
        cpu_load_s=load["cpu_s"],
        cpu_sink_s=sink.cpu - sink_before,
    )


def run_smg(
    base: Path, knot: KnotDNS, args: argparse.Namespace, seed: int, workers: int | None = None
) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="smg-", dir=base))
    sink = Sink(workdir)
    extra = json.loads(args.smg_config)
    name = "smg serve"
    if workers is not None:
        extra.setdefault("gateway", {})["workers"] = workers
        name = f"smg w{workers}"
    relay = SmgServe(workdir, sink, knot, extra)
    try:
        return measure(name, relay.endpoint, sink, relay.proc.pid, args, seed)
    finally:
        relay.stop()
        sink.stop()


def run_postfix(base: Path, args: argparse.Namespace, seed: int) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix="postfix-", dir=base))
    workdir.chmod(0o755)  # Postfix's daemons run as postfix and must reach their queue
    sink = Sink(workdir)
    postfix = PostfixRelay(sink.endpoint, POSTFIX_IP, workdir / "postfix")
    try:
        postfix.start()
        assert postfix.proc is not None
        return measure("postfix", postfix.endpoint, sink, postfix.proc.pid, args, seed)
    finally:
        postfix.stop()
        sink.stop()


# --- output ---------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    head = (
        f"{'stack':<10} {'msgs':>6} {'fail':>4} {'msg/s e2e':>10} {'accept/s':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'CPU ms/msg':>10} {'peak RSS MB':>11} {'peak PSS MB':>11}"
        f" {'cores MTA/load/sink':>20}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        wall = max(r.seconds, 1e-3)
        cores = f"{r.cpu_mta_s / wall:.2f}/{r.cpu_load_s / wall:.2f}/{r.cpu_sink_s / wall:.2f}"
        rows.append(
            f"{r.stack:<10} {r.messages:>6} {r.failed:>4} {r.msg_per_s:>10.0f} "
            f"{r.accept_msg_per_s:>9.0f} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f} {r.cpu_ms:>10.2f} "
            f"{r.peak_rss_mb:>11.1f} {r.peak_pss_mb:>11.1f} {cores:>20}"
        )
    return "\n".join(rows)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def workers_summary(results: list[Result], workers: list[int]) -> str:
    """Medians per worker count, their ratios to each other and to Postfix, and what the relay
    alone would scale to: its rate per core it used (the load and the sink share the cores)."""
    medians = {w: _median([r.msg_per_s for r in results if r.stack == f"smg w{w}"])
               for w in workers}  # fmt: skip
    postfix = _median([r.msg_per_s for r in results if r.stack == "postfix"])
    lines = []
    for w, rate in medians.items():
        runs = [r for r in results if r.stack == f"smg w{w}"]
        cores = _median([r.cpu_mta_s / max(r.seconds, 1e-3) for r in runs])
        others = _median([(r.cpu_load_s + r.cpu_sink_s) / max(r.seconds, 1e-3) for r in runs])
        vs = f", {rate / postfix:.2f}x postfix" if postfix else ""
        per_core = rate / max(cores, 1e-3)
        lines.append(f"smg w{w}: {rate:.0f} msg/s{vs}; relay used {cores:.2f} cores, load+sink "
                     f"{others:.2f}; {per_core:.0f} msg/s per relay core")  # fmt: skip
    if len(workers) > 1 and medians[workers[0]]:
        top, first = workers[-1], workers[0]
        lines.append(f"workers {top}/{first}: {medians[top] / medians[first]:.2f}x")
    return "\n".join(lines)


def summary(results: list[Result], rounds: list[tuple[Result, Result]]) -> str:
    smg = _median([a.msg_per_s for a, _ in rounds])
    postfix = _median([r.msg_per_s for r in results if r.stack == "postfix"])
    if not smg or not postfix:
        return ""
    ratios = [a.msg_per_s / b.msg_per_s for a, b in rounds]
    per_round = ", ".join(f"{x:.2f}x" for x in ratios)
    return (
        f"end to end, median of rounds: smg serve {smg:.0f} msg/s, postfix {postfix:.0f} msg/s, "
        f"ratio {smg / postfix:.2f}x; per round (same minute) {per_round}, median "
        f"{_median(ratios):.2f}x (target >= 1.5x)"
    )


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.relay", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--messages", type=int, default=2000, help="per stack and round")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--size", type=int, default=5000, help="message size in bytes")
    parser.add_argument("--warmup", type=int, default=200, help="messages before measuring")
    parser.add_argument("--rounds", type=int, default=2, help="alternating smg/postfix rounds")
    parser.add_argument("--only", choices=["smg", "postfix"], help="measure one stack only")
    parser.add_argument("--workdir", default="/var/tmp", help="on a real disk (fsync counts)")
    parser.add_argument("--smg-config", default="{}", help='extra smg config as JSON, e.g. '
                        '\'{"delivery": {"concurrency": 32}}\'')  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--workers", help="smg with each of these gateway.workers in every "
                        "round, e.g. 1,2 (default: once, as --smg-config says)")  # fmt: skip
    parser.add_argument(
        "--nice", type=int, default=-10,
        help="niceness of the bench and everything it starts, both stacks alike (default -10: "
        "other load on a shared machine disturbs the measurement less; 0 to leave it)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (Postfix queue directories belong to the postfix user)", file=sys.stderr)
        return 2
    if args.nice:
        os.nice(args.nice)  # inherited by the sink, the load, smg serve, Postfix and knotd
    base = Path(tempfile.mkdtemp(prefix="relaybench-", dir=args.workdir))
    base.chmod(0o755)
    knot = KnotDNS(zones=ZONES, address=DNS_IP)
    results: list[Result] = []
    rounds: list[tuple[Result, Result]] = []
    load_before = _load()
    try:
        knot.start()
        workers = [int(w) for w in args.workers.split(",")] if args.workers else [None]
        smgs = [f"smg{w}" if w else "smg" for w in workers]
        for round_no in range(args.rounds):
            order = [*smgs, "postfix"] if round_no % 2 == 0 else ["postfix", *smgs[::-1]]
            this_round: dict[str, Result] = {}
            for stack in order:
                if args.only and not stack.startswith(args.only):
                    continue
                seed = 100 + round_no
                count = int(stack[3:]) if stack.startswith("smg") and stack[3:] else None
                result = (
                    run_smg(base, knot, args, seed, count)
                    if stack.startswith("smg")
                    else run_postfix(base, args, seed)
                )
                results.append(result)
                this_round["smg" if stack == smgs[0] else stack] = result
                print(f"round {round_no + 1}: {table([result]).splitlines()[-1]}", flush=True)
            if "smg" in this_round and "postfix" in this_round:
                rounds.append((this_round["smg"], this_round["postfix"]))
    finally:
        knot.close()
        shutil.rmtree(base, ignore_errors=True)
    print()
    smg_extra = f", smg config {args.smg_config}" if args.smg_config != "{}" else ""
    smg_extra += f", nice {os.nice(0)}"
    print(f"{args.messages} messages of {args.size} bytes over {args.connections} connections, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average "
          f"{load_before} before, {_load()} after{smg_extra}")  # fmt: skip
    print(table(results))
    line = summary(results, rounds)
    if line:
        print(line)
    if args.workers:
        print(workers_summary(results, [int(w) for w in args.workers.split(",")]))
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
