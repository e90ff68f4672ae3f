"""The full pipeline through `smg serve` beside Postfix with milters, in one run.

    .venv/bin/python bench/pipeline/run.py [--messages 2000] [--connections 16] [--size 5000]
                                           [--rounds 2] [--warmup 100] [--only smg|postfix]

Both stacks do the same work on the same message mix (5 KB business mails, each unique),
sent over 16 SMTP connections and relayed to the same kind of sink:

- smg:     `smg serve` (role good): sender domain check (knot DNS), clamd INSTREAM, rspamd
           checkv2, DKIM RSA-2048, SQLite spool (synchronous=FULL, fsync before the 250),
           delivery to the sink's MX;
- postfix: Postfix 3.7 (its queue fsyncs before the 250) with clamav-milter (same clamd),
           rspamd's proxy worker in milter mode (same rspamd instance, self-scan, as many
           scanning processes as the normal worker has), OpenDKIM (RSA-2048, relaxed/relaxed,
           From oversigned), relaying to the sink.

Measured per stack and round: end-to-end msg/s (first message sent to last message at the
sink), p50/p99 of the final reply to the client, CPU per message of the MTA (smg; Postfix +
its milters) and of the shared scanners, and that every message arrived DKIM-signed.
Stacks alternate per round; the figure reported is the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.common import run_load, tree  # noqa: E402
from bench.pipeline.stack import ClamavMilter, OpenDkimMilter, PostfixRelay  # noqa: E402
from bench.tenants.config import tenants_toml  # noqa: E402
from gateway.dkim import write_new_key  # noqa: E402
from tests.harness import Clamd, free_port  # noqa: E402
from tests.harness.knot import KnotDNS  # noqa: E402
from tests.harness.rspamd import Rspamd  # noqa: E402
from tests.harness.util import terminate_pid, wait_for  # noqa: E402

TOOLS = Path(__file__).parents[1] / "common.py"  # the sink and the load, shared
SINK_IP, SMG_IP = "127.0.26.80", "127.0.26.81"
SENDER_DOMAIN, FAR_DOMAIN = "bench-sender.test", "bench-far.test"
DKIM_HEADERS = ["from", "to", "subject", "date", "message-id", "mime-version", "content-type"]


def cpu_of(pids: list[int]) -> float:
    return sum(tree(pid)[0] for pid in pids)


# --- the pieces -----------------------------------------------------------------------------


class Sink:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port(SINK_IP)
        self.state = workdir / f"sink-{self.port}.state"
        self.proc = subprocess.Popen(
            [sys.executable, str(TOOLS), "sink", SINK_IP, str(self.port), str(self.state),
             "signed"],
            start_new_session=True,
        )  # fmt: skip
        wait_for(self.state.exists, 10, what="the sink")

    @property
    def endpoint(self) -> str:
        return f"{SINK_IP}:{self.port}"

    def read(self) -> tuple[int, int, float, float]:
        text = self.state.read_text().split()
        if len(text) != 4:
            return 0, 0, 0.0, 0.0
        return int(text[0]), int(text[1]), float(text[2]), float(text[3])

    def stop(self) -> None:
        terminate_pid(self.proc.pid, 10)


class SmgServe:
    """`smg serve` as a process, stopped by its PID."""

    def __init__(self, workdir: Path, config: str) -> None:
        self.dir = workdir
        self.port = free_port(SMG_IP)
        config_path = workdir / "smg.toml"
        config_path.write_text(config.replace("@PORT@", str(self.port)))
        self.log = (workdir / "smg.log").open("ab")
        # SMG_BENCH_PROFILE=FILE: run the relay under cProfile (written when it stops).
        profile = os.environ.get("SMG_BENCH_PROFILE")
        python = [sys.executable, *(["-m", "cProfile", "-o", profile] if profile else [])]
        self.proc = subprocess.Popen(
            [*python, "-m", "gateway.cli", "serve", "--config", str(config_path)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )  # fmt: skip
        (workdir / "smg.pid").write_text(str(self.proc.pid))
        wait_for(lambda: self._up(), 30, what="smg serve")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"smg serve exited: {(self.dir / 'smg.log').read_text()[-2000:]}")
        import socket

        with socket.create_connection((SMG_IP, self.port), timeout=1):
            return True

    @property
    def endpoint(self) -> str:
        return f"{SMG_IP}:{self.port}"

    def stop(self) -> None:
        terminate_pid(self.proc.pid, 40)
        self.log.close()


def smg_config(workdir: Path, knot: KnotDNS, clamd: Clamd, rspamd_url: str, key: Path,
               sink: Sink, without: set[str] = frozenset(), workers: int = 1,
               tenants: int = 0) -> str:  # fmt: skip
    """The relay's config; ``without`` turns features off ("virus", "spam", "dkim") to
    measure what each one costs."""
    text = f"""
[gateway]
hostname = "smg-bench.example.net"
role = "good"
workers = {workers}
listen = ["{SMG_IP}:@PORT@"]
source_address = "{SMG_IP}"
spool = "{workdir / "spool"}"
client_networks = ["127.0.0.0/8"]
max_connections = 400
[dns]
nameservers = ["{knot.nameserver}"]
extra_public_networks = ["127.0.0.0/8"]
[delivery]
port = {sink.port}
concurrency = 64
max_connections_per_host = 16
[virus]
clamd = "unix:{clamd.socket_path}"
[spam]
rspamd_url = "{rspamd_url}"
[routing]
bad_gateways = ["127.0.26.82:25"]
[mta_sts]
enabled = false
[dkim]
headers = {json.dumps(DKIM_HEADERS)}
[[dkim.keys]]
domain = "{SENDER_DOMAIN}"
selector = "bench"
key = "{key}"
"""
    if "virus" in without:
        text = text.replace("[virus]\n", "[virus]\nenabled = false\n")
    if "spam" in without:
        text = text.replace("[spam]\n", "[spam]\nenabled = false\n")
    if "dkim" in without:
        text = text[: text.index("[[dkim.keys]]")]
    if tenants:  # issue 11: N customers, the bench's clients (loopback) are the first one
        first: dict[str, Any] = {
            "networks": ["127.0.0.0/8"],
            "domains": [SENDER_DOMAIN],
            "limits": {"max_sessions": 10000, "max_sessions_per_ip": 10000,
                       "messages_per_hour": 100_000_000, "recipients_per_hour": 100_000_000},
        }  # fmt: skip
        if "dkim" not in without:
            text = text[: text.index("[[dkim.keys]]")]  # the customer's own key signs
            first["dkim"] = [{"domain": SENDER_DOMAIN, "selector": "bench", "key": str(key)}]
        text += tenants_toml(tenants, first)
    return text


def measure(name: str, endpoint: str, sink: Sink, mta_pids: list[int], scanner_pids: list[int],
            args: argparse.Namespace, seed: int) -> dict[str, Any]:  # fmt: skip
    warm = run_load(endpoint, args.warmup, min(args.connections, args.warmup), args.size, seed)
    wait_for(lambda: sink.read()[0] >= warm["sent"], 120, interval=0.2, what="warm-up at sink")
    base_count = sink.read()[0]
    mta_before, scan_before = cpu_of(mta_pids), [cpu_of([pid]) for pid in scanner_pids]
    sink_before = cpu_of([sink.proc.pid])
    started = time.time()
    result = run_load(endpoint, args.messages, args.connections, args.size, seed + 1)
    load_cpu = result["cpu_s"]
    expected = base_count + result["sent"]
    wait_for(lambda: sink.read()[0] >= expected, 600, interval=0.1, what=f"{name} at the sink")
    count, signed, _, last = sink.read()
    mta_cpu = cpu_of(mta_pids) - mta_before
    clamd_cpu, rspamd_cpu = (
        cpu_of([pid]) - b for pid, b in zip(scanner_pids, scan_before, strict=True)
    )
    seconds = last - started
    sink_cpu = cpu_of([sink.proc.pid]) - sink_before
    return {
        # cores each party used over the run (the machine has os.cpu_count() of them)
        "cores": {
            "mta": mta_cpu / seconds,
            "clamd": clamd_cpu / seconds,
            "rspamd": rspamd_cpu / seconds,
            "load": load_cpu / seconds,
            "sink": sink_cpu / seconds,
        },
        "stack": name,
        "messages": result["sent"],
        "failed": result["failed"],
        "failures": result["failures"],
        "msg_per_s": result["sent"] / seconds,
        "accept_msg_per_s": result["sent"] / result["seconds"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "mta_cpu_ms": 1000 * mta_cpu / result["sent"],
        "clamd_cpu_ms": 1000 * clamd_cpu / result["sent"],
        "rspamd_cpu_ms": 1000 * rspamd_cpu / result["sent"],
        "all_signed": signed == count,
    }


def run_smg(base: Path, knot, clamd, rspamd, key, args, seed, workers=None) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="smg-", dir=base))
    sink = Sink(workdir)
    config = smg_config(
        workdir,
        knot,
        clamd,
        f"unix:{base / 'rspamd-normal.sock'}",
        key,
        sink,
        set(args.smg_without),
        workers or args.smg_workers,
        args.tenants,
    )
    relay = SmgServe(workdir, config)
    name = f"smg w{workers}" if workers else "smg"
    try:
        scanners = [clamd.proc.pid, rspamd.proc.pid]  # type: ignore[union-attr]
        return measure(name, relay.endpoint, sink, [relay.proc.pid], scanners, args, seed)
    finally:
        relay.stop()
        sink.stop()


def run_postfix(base: Path, clamd, rspamd, rspamd_milter, key, args, seed) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="postfix-", dir=base))
    workdir.chmod(0o755)  # Postfix's daemons run as postfix and must reach their queue
    sink = Sink(workdir)
    clam = ClamavMilter(clamd.socket_path, workdir=workdir / "clamav-milter")
    dkim = OpenDkimMilter(SENDER_DOMAIN, "bench", key, DKIM_HEADERS)
    daemons: list[Any] = [clam, dkim]
    try:
        clam.start()
        dkim.start()
        milters = [clam.milter, f"unix:{rspamd_milter}", dkim.milter]
        postfix = PostfixRelay(sink.endpoint, milters, workdir=workdir / "postfix")
        daemons.append(postfix)
        postfix.start()
        mta = [postfix.proc.pid, clam.proc.pid, dkim.proc.pid]  # type: ignore[union-attr]
        scanners = [clamd.proc.pid, rspamd.proc.pid]  # type: ignore[union-attr]
        return measure("postfix", postfix.endpoint, sink, mta, scanners, args, seed)
    finally:
        for daemon in reversed(daemons):
            daemon.close()
        sink.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--only", choices=["smg", "postfix"])
    parser.add_argument("--smg-workers", type=int, default=1, help="gateway.workers for smg")
    parser.add_argument("--workers", help="smg with each of these gateway.workers in every "
                        "round, e.g. 1,2 (instead of --smg-workers)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="spools and queues: a real disk (fsync is measured)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smg-without", action="append", default=[],
                        choices=["virus", "spam", "dkim"],
                        help="turn a feature off in smg (to see what it costs)")  # fmt: skip
    parser.add_argument("--tenants", type=int, default=0,
                        help="smg with this many [[tenants]] (4 networks each; the bench's "
                             "clients are the first): the cost of issue 11")  # fmt: skip
    parser.add_argument("--nice", type=int, default=-10,
                        help="niceness of the bench and all it starts, both stacks and the "
                             "scanners alike (default -10: other load disturbs less)")  # fmt: skip
    args = parser.parse_args()
    if args.nice:
        os.nice(args.nice)  # inherited by knotd, clamd, rspamd, sinks, loads, smg, Postfix

    base = Path(tempfile.mkdtemp(prefix="smg-bench-pipeline-", dir=args.workdir))
    base.chmod(0o755)
    knot = KnotDNS()
    clamd = Clamd(extra_config={"MaxThreads": "8"})
    # Both stacks reach rspamd over Unix sockets, as on a gateway host: smg the normal
    # worker (spam.rspamd_url = unix:...), Postfix the proxy worker in milter mode.
    normal_socket, milter_socket = base / "rspamd-normal.sock", base / "rspamd-milter.sock"
    proxy = (
        "milter = yes;\ntimeout = 120s;\ncount = 2;\n"
        f'bind_socket = "{milter_socket} mode=0666";\n'
        'upstream "local" {\n  default = yes;\n  self_scan = yes;\n}\n'
        'discard_on_reject = false;\nquarantine_on_reject = false;\nspam_header = "X-Spam";\n'
    )
    results: list[dict[str, Any]] = []
    try:
        knot.start()
        knot.set_zone(SENDER_DOMAIN, f"@ MX 10 mx\nmx A {SINK_IP}\n")
        knot.set_zone(FAR_DOMAIN, f"@ MX 10 mx\nmx A {SINK_IP}\n")
        rspamd = Rspamd(nameserver=knot.nameserver, override_d={"worker-proxy.inc": proxy})
        rspamd.port, rspamd.controller_port = free_port(), free_port()
        rspamd.local_d["worker-normal.inc"] = (
            f'bind_socket = "127.0.0.1:{rspamd.port}";\n'
            f'bind_socket = "{normal_socket} mode=0666";\ncount = 2;\n'
        )
        clamd.start()
        rspamd.start()
        key, _ = write_new_key(base / "keys", SENDER_DOMAIN, "bench", "rsa")
        smgs = [f"smg{w}" for w in args.workers.split(",")] if args.workers else ["smg"]
        stacks = [*smgs, "postfix"]
        if args.only is not None:
            stacks = [s for s in stacks if s.startswith(args.only)]
        for round_no in range(args.rounds):
            order = stacks if round_no % 2 == 0 else stacks[::-1]
            for stack in order:
                seed = 10 * round_no + 1
                if stack.startswith("smg"):
                    workers = int(stack[3:]) if stack[3:] else None
                    result = run_smg(base, knot, clamd, rspamd, key, args, seed, workers)
                else:
                    result = run_postfix(base, clamd, rspamd, milter_socket, key, args, seed)
                result["round"] = round_no + 1
                results.append(result)
                print(_line(result), flush=True)
        rspamd.close()
    finally:
        clamd.close()
        knot.close()
        shutil.rmtree(base, ignore_errors=True)
    print(_summary(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _line(r: dict[str, Any]) -> str:
    return (
        f"round {r['round']} {r['stack']:<8} {r['msg_per_s']:7.1f} msg/s end to end "
        f"({r['accept_msg_per_s']:7.1f} accepted/s), 250 p50 {r['p50_ms']:6.1f} ms "
        f"p99 {r['p99_ms']:6.1f} ms, CPU/msg: MTA {r['mta_cpu_ms']:5.2f} ms, clamd "
        f"{r['clamd_cpu_ms']:5.2f} ms, rspamd {r['rspamd_cpu_ms']:5.2f} ms; failed "
        f"{r['failed']}, all signed {r['all_signed']}; cores used: "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["cores"].items())
    )


def _summary(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    by_stack: dict[str, list[float]] = {}
    for r in results:
        by_stack.setdefault(r["stack"], []).append(r["msg_per_s"])
    lines = [
        f"\n{args.messages} messages of {args.size} B over {args.connections} connections, "
        f"{args.rounds} round(s); median end-to-end msg/s:"
    ]
    medians = {stack: statistics.median(v) for stack, v in by_stack.items()}
    for stack, median in medians.items():
        lines.append(f"  {stack:<8} {median:7.1f} msg/s")
    if "smg" in medians and "postfix" in medians:
        lines.append(f"  ratio smg/postfix: {medians['smg'] / medians['postfix']:.2f}x")
    smgs = sorted(s for s in medians if s.startswith("smg w"))
    for stack in smgs:
        runs = [r for r in results if r["stack"] == stack]
        cores = {k: statistics.median(r["cores"][k] for r in runs) for k in runs[0]["cores"]}
        vs = f", {medians[stack] / medians['postfix']:.2f}x postfix" if "postfix" in medians else ""
        lines.append(
            f"  {stack}: {medians[stack]:.0f} msg/s{vs}; cores: "
            + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
            + f"; {medians[stack] / max(cores['mta'], 1e-3):.0f} msg/s per relay core"
        )
    if len(smgs) > 1:
        lines.append(f"  workers {smgs[-1][5:]}/{smgs[0][5:]}: "
                     f"{medians[smgs[-1]] / medians[smgs[0]]:.2f}x")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
