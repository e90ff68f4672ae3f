"""Backlog bench: a big queue for a dead destination, and what it does to everything else.

    python -m bench.backlog [--backlog 1000000] [--postfix-backlog 50000] [--messages 2000]

Per stack (``smg serve``, then Postfix 3.7 with a transport per destination):

1. empty queue: MESSAGES 5 KB messages to a healthy destination (a sink) over 16 connections:
   accept rate (the 250s) and healthy delivery rate (first sent to last at the sink);
2. the backlog: BACKLOG small messages for ``dead.test``, whose MX greets with ``421`` (smg:
   written straight into the spool, all due now; Postfix: sent over SMTP while the far end
   is down, then ``postqueue -f`` so that all are due, its worst case too);
3. restart in the middle of it: seconds to the first ``250`` and to that message delivered;
4. the same load as in 1 with the backlog queued and due: accept and healthy delivery rates;
5. the first page of the queue listing (``smg queue list --json --limit 100``; ``postqueue -j``
   read up to 100 messages);
6. the dead destination recovers (a sink in place of the 421 far end, ``smg queue flush
   --destination dead.test`` / ``postqueue -f``): messages per second drained over DRAIN s.

The ratios printed (backlog / empty) are the issue's targets: accept and healthy delivery
within 20 % of the empty queue, restart to accept < 5 s, first page < 1 s.  CPU seconds of each
party (MTA, load client, sinks) are printed for the loaded phases.  Needs root, knotd, Postfix.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import common
from bench.backlog.pieces import (
    DEAD,
    DEAD_IP,
    DNS_IP,
    HEALTHY,
    SINK_IP,
    SMG_IP,
    ZONES,
    Far421,
    PostfixBacklog,
    Sink,
    Smg,
    fill_spool,
    restart_times,
)
from bench.common import make_message
from tests.harness.knot import KnotDNS
from tests.harness.util import free_port, wait_for


def run_load(endpoint: str, count: int, rcpt: str, seed: int, args) -> dict[str, Any]:
    return common.run_load(endpoint, count, args.connections, args.size, seed, rcpt, 3600)


def loaded_phase(mta: Any, endpoint: str, sink: Sink, args, seed: int) -> dict[str, float]:
    """MESSAGES to HEALTHY: rates, and the CPU seconds of each party meanwhile."""
    base = sink.read()[0]
    cpu = (mta.cpu, sink.cpu)
    load = run_load(endpoint, args.messages, HEALTHY, seed, args)
    wait_for(lambda: sink.read()[0] >= base + load["sent"], 900, interval=0.05,
             what="the healthy mail at the sink")  # fmt: skip
    last = sink.read()[2]
    return {
        "accept_per_s": load["sent"] / load["seconds"],
        "healthy_per_s": load["sent"] / (last - load["started"]),
        "failed": load["failed"],
        "cpu_mta_s": mta.cpu - cpu[0],
        "cpu_sink_s": sink.cpu - cpu[1],
        "cpu_load_s": load["cpu_s"],
    }


def drain(dead_sink: Sink, seconds: float) -> float:
    """Messages per second arriving at the recovered destination over ``seconds`` from the
    first one."""
    wait_for(lambda: dead_sink.read()[0] > 0, 300, interval=0.05, what="the first drained")
    first = dead_sink.read()[1]
    time.sleep(max(0.0, first + seconds - time.time()))
    count, first, last = dead_sink.read()
    return count / max(1e-3, last - first)


# --- smg ---------------------------------------------------------------------------------------


def run_smg(base: Path, knot: KnotDNS, args) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="smg-", dir=base))
    port = free_port(SINK_IP)
    sink = Sink(work, SINK_IP, port, "sink")
    extra = json.loads(args.smg_config)
    extra.setdefault("delivery", {}).update({"throttle_pause": "10s", "throttle_pause_max": "20s"})
    smg = Smg(work, free_port(SMG_IP), port, knot, extra)
    far = dead_sink = None
    out: dict[str, float] = {}
    try:
        smg.start()
        run_load(smg.endpoint, 200, HEALTHY, 1, args)  # warm-up
        out.update(
            {f"empty_{k}": v for k, v in loaded_phase(smg, smg.endpoint, sink, args, 2).items()}
        )
        smg.stop()
        data = make_message(0, 600, random.Random(0))
        out["fill_s"] = fill_spool(smg.spool / "queue.sqlite", args.backlog, data, time.time())
        out["spool_mb"] = (smg.spool / "queue.sqlite").stat().st_size / 2**20
        print(f"smg: {args.backlog} queued in {out['fill_s']:.0f} s, "
              f"spool {out['spool_mb']:.0f} MB", flush=True)  # fmt: skip
        far = Far421(DEAD_IP, port)
        host, smg_port = smg.endpoint.rsplit(":", 1)
        out["restart_accept_s"], out["restart_deliver_s"] = restart_times(
            lambda: smg.start(wait=False), host, int(smg_port), sink
        )
        out.update(
            {f"backlog_{k}": v for k, v in loaded_phase(smg, smg.endpoint, sink, args, 3).items()}
        )
        out["list_first_page_s"], _ = smg.cli("list", "--json", "--limit", "100")
        far.stop()
        far = None
        dead_sink = Sink(work, DEAD_IP, port, "dead")
        out["flush_s"], said = smg.cli("flush", "--destination", "dead.test")
        out["drain_per_s"] = drain(dead_sink, args.drain)
        print(f"smg: flush said {said.strip()!r}", flush=True)
    finally:
        smg.stop()
        for piece in (far, dead_sink, sink):
            if piece is not None:
                piece.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


# --- Postfix ---------------------------------------------------------------------------------


def run_postfix(base: Path, args) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="postfix-", dir=base))
    work.chmod(0o755)
    port = free_port(SINK_IP)
    sink = Sink(work, SINK_IP, port, "sink")
    far = Far421(DEAD_IP, port)
    postfix = PostfixBacklog(port, work / "postfix")
    dead_sink = None
    out: dict[str, float] = {}
    try:
        postfix.start()
        run_load(postfix.endpoint, 200, HEALTHY, 1, args)
        out.update(
            {
                f"empty_{k}": v
                for k, v in loaded_phase(postfix, postfix.endpoint, sink, args, 2).items()
            }
        )
        started = time.monotonic()
        sent = 0
        while sent < args.postfix_backlog:  # in pieces, so the load's memory stays small
            piece = min(20_000, args.postfix_backlog - sent)
            sent += run_load(postfix.endpoint, piece, DEAD, 10 + sent, _small(args))["sent"]
        wait_for(lambda: postfix.queue_files("incoming", "active") == 0, 3600, interval=1,
                 what="Postfix's backlog deferred")  # fmt: skip
        out["fill_s"] = time.monotonic() - started
        out["queued"] = postfix.queue_files("deferred")
        print(f"postfix: {out['queued']:.0f} deferred in {out['fill_s']:.0f} s", flush=True)
        postfix.stop()
        host, pf_port = postfix.endpoint.rsplit(":", 1)
        out["restart_accept_s"], out["restart_deliver_s"] = restart_times(
            postfix.start, host, int(pf_port), sink
        )
        postfix.postqueue("-f")  # every deferred message due now (smg's spool: all due)
        out.update(
            {
                f"backlog_{k}": v
                for k, v in loaded_phase(postfix, postfix.endpoint, sink, args, 3).items()
            }
        )
        out["list_first_page_s"] = _postqueue_first(postfix, 100)
        far.stop()
        far = None
        dead_sink = Sink(work, DEAD_IP, port, "dead")
        started = time.monotonic()
        postfix.postqueue("-f")
        out["flush_s"] = time.monotonic() - started
        out["drain_per_s"] = drain(dead_sink, args.drain)
    finally:
        postfix.stop()
        for piece in (far, dead_sink, sink):
            if piece is not None:
                piece.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


def _small(args) -> argparse.Namespace:
    small = argparse.Namespace(**vars(args))
    small.size = 600
    return small


def _postqueue_first(postfix: PostfixBacklog, count: int) -> float:
    """Seconds until ``postqueue -j`` printed ``count`` messages (then it is stopped)."""
    started = time.monotonic()
    proc = subprocess.Popen(["postqueue", "-c", str(postfix.config_dir), "-j"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    for n, _ in enumerate(proc.stdout, 1):
        if n >= count:
            break
    took = time.monotonic() - started
    proc.kill()
    proc.wait()
    return took


# --- output ------------------------------------------------------------------------------------

ROWS = [
    ("accept msg/s, empty queue", "empty_accept_per_s", "{:.0f}"),
    ("accept msg/s, backlog", "backlog_accept_per_s", "{:.0f}"),
    ("healthy delivery msg/s, empty", "empty_healthy_per_s", "{:.0f}"),
    ("healthy delivery msg/s, backlog", "backlog_healthy_per_s", "{:.0f}"),
    ("restart to accept s", "restart_accept_s", "{:.2f}"),
    ("restart to deliver s", "restart_deliver_s", "{:.2f}"),
    ("queue list first 100 s", "list_first_page_s", "{:.2f}"),
    ("flush of the destination s", "flush_s", "{:.2f}"),
    ("drain msg/s after recovery", "drain_per_s", "{:.0f}"),
    ("CPU s MTA / load / sink, empty", "empty_cpu", "{}"),
    ("CPU s MTA / load / sink, backlog", "backlog_cpu", "{}"),
]


def report(results: dict[str, dict[str, float]]) -> str:
    for r in results.values():
        for phase in ("empty", "backlog"):
            if f"{phase}_cpu_mta_s" in r:
                r[f"{phase}_cpu"] = "{:.1f} / {:.1f} / {:.1f}".format(  # type: ignore[assignment]
                    r[f"{phase}_cpu_mta_s"], r[f"{phase}_cpu_load_s"], r[f"{phase}_cpu_sink_s"]
                )
    names = list(results)
    lines = [f"{'':<34}" + "".join(f"{n:>22}" for n in names), "-" * (34 + 22 * len(names))]
    for label, key, form in ROWS:
        cells = [form.format(results[n][key]) if key in results[n] else "-" for n in names]
        lines.append(f"{label:<34}" + "".join(f"{c:>22}" for c in cells))
    for n in names:
        r = results[n]
        if "backlog_accept_per_s" in r:
            accept = r["backlog_accept_per_s"] / r["empty_accept_per_s"]
            healthy = r["backlog_healthy_per_s"] / r["empty_healthy_per_s"]
            lines.append(
                f"{n}: backlog/empty accept {accept:.2f}x, healthy delivery {healthy:.2f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backlog",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--backlog", type=int, default=1_000_000, help="smg's queued messages")
    parser.add_argument("--postfix-backlog", type=int, default=50_000,
                        help="Postfix's (filled over SMTP: about 1 ms each)")  # fmt: skip
    parser.add_argument("--messages", type=int, default=2000, help="healthy load per phase")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--drain", type=float, default=30.0, help="seconds of drain measured")
    parser.add_argument("--only", choices=["smg", "postfix"])
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--smg-config", default="{}", help="extra smg config as JSON")
    parser.add_argument("--nice", type=int, default=-10)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (Postfix's queue belongs to the postfix user)", file=sys.stderr)
        return 2
    if args.nice:
        os.nice(args.nice)
    base = Path(tempfile.mkdtemp(prefix="backlogbench-", dir=args.workdir))
    base.chmod(0o755)
    knot = KnotDNS(zones=ZONES, address=DNS_IP)
    results: dict[str, dict[str, float]] = {}
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    try:
        knot.start()
        if args.only != "postfix":
            results["smg serve"] = run_smg(base, knot, args)
        if args.only != "smg":
            results["postfix"] = run_postfix(base, args)
    finally:
        knot.close()
        shutil.rmtree(base, ignore_errors=True)
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"\nbacklog: smg {args.backlog}, postfix {args.postfix_backlog} messages for a 421 far "
          f"end; {args.messages} healthy messages of {args.size} bytes over {args.connections} "
          f"connections; {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load "
          f"{load_before} before, {load_after} after, smg config {args.smg_config}")  # fmt: skip
    print(report(results))
    print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
