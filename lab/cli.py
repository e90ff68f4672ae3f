"""`python -m lab up|down|status|ssh HOST|exec HOST CMD`."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lab import dns, fleet, net, sshkeys, state
from lab.config import REPO_DIR, VENV_BIN, host_by_name
from lab.proc import LabError
from lab.zones import CUSTOMER_DOMAINS, default_zones

log = logging.getLogger("lab")

DEPLOY_TIMEOUT = 1800


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="lab: %(message)s",
    )
    if os.geteuid() != 0:
        print("lab: must run as root (network namespaces, mounts, systemd-nspawn)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 1
    except KeyError as exc:
        print(f"lab: error: {exc.args[0]}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and the like: not an error of the lab.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command run")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="bring the lab up (idempotent)")
    p.add_argument("--rebuild-image", action="store_true", help="debootstrap the base again")
    p.add_argument("--deploy", action="store_true", help="then run the pyinfra deploy")
    p.add_argument(
        "--keep-on-failure", action="store_true", help="leave a failed up as is to inspect"
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="take everything down (idempotent)")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="show whether the lab is up and its hosts")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ssh", help="interactive SSH session to a gateway host")
    p.add_argument("host")
    p.set_defaults(func=cmd_ssh)

    p = sub.add_parser("exec", help="run a command on a lab host (gateways via SSH, others netns)")
    p.add_argument("host")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_exec)
    return parser


def cmd_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    was_up = fleet.is_up()
    current = fleet.up(rebuild_image=args.rebuild_image, keep_on_failure=args.keep_on_failure)
    if not was_up:
        log.info("lab up in %.1f s", time.monotonic() - started)
    publish_dkim()
    print_summary(current)
    if args.deploy:
        return run_deploy()
    return 0


def run_deploy() -> int:
    """The deploy helper owns deploy.py; run exactly its documented commands, if it exists:
    the lab's DKIM keys (made only on purpose, as in production), then the deploy."""
    if not (REPO_DIR / "deploy.py").exists():
        log.info("--deploy: no deploy.py in %s yet, nothing to deploy", REPO_DIR)
        return 0
    keys = [str(VENV_BIN / "python"), "-m", "deploykit", "dkim-keys", "inventories/lab.py"]
    deploy = [str(VENV_BIN / "pyinfra"), "inventories/lab.py", "deploy.py", "-y"]
    for argv in (keys, deploy):
        log.info("deploying: %s", " ".join(argv))
        try:
            done = subprocess.run(argv, cwd=REPO_DIR, timeout=DEPLOY_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            log.error("%s did not finish in %d s", argv[1], DEPLOY_TIMEOUT)
            return 1
        if done.returncode != 0:
            return done.returncode
    return 0


def publish_dkim() -> None:
    """Make the lab's DKIM keys (the kit's command: existing keys are kept) and serve their
    records in the customer zones, as a customer publishes them before the first signed mail;
    the deploy signs only with published keys (deploykit.dnscheck)."""
    if not (REPO_DIR / "inventories" / "lab.py").exists():
        return
    keys = [str(VENV_BIN / "python"), "-m", "deploykit", "dkim-keys", "inventories/lab.py"]
    done = subprocess.run(keys, cwd=REPO_DIR, timeout=300, check=False)
    if done.returncode != 0:
        raise LabError("python -m deploykit dkim-keys inventories/lab.py failed")
    zones = default_zones()
    for domain in CUSTOMER_DOMAINS:
        dns.set_zone(domain, zones[domain])
    log.info("DKIM records published in %s", ", ".join(CUSTOMER_DOMAINS))


def cmd_down(args: argparse.Namespace) -> int:
    started = time.monotonic()
    fleet.down()
    left = fleet.leftovers()
    if left:
        print("lab: still present after down: " + ", ".join(left), file=sys.stderr)
        return 1
    log.info("lab down in %.1f s, nothing left behind", time.monotonic() - started)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if not fleet.is_up():
        left = fleet.leftovers()
        print("lab: down" + (f" (leftovers: {', '.join(left)})" if left else ""))
        return 3
    print_summary(state.read() or {})
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    host = host_by_name(args.host)
    if host.kind != "gateway":
        raise LabError(f"{host.name} has no sshd; use `python -m lab exec {host.name} CMD`")
    os.execvp("ssh", sshkeys.ssh_argv(host.name))
    return 1  # not reached


def cmd_exec(args: argparse.Namespace) -> int:
    host = host_by_name(args.host)
    command = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else args.command
    if not command:
        raise LabError("exec needs a command")
    if host.kind == "gateway":
        argv = sshkeys.ssh_argv(host.name, command)
    else:
        argv = net.netns_exec(host, command)
    os.execvp(argv[0], argv)
    return 1  # not reached


def print_summary(current: dict[str, Any]) -> None:
    ssh_config = Path(current.get("ssh_config", ""))
    print("lab is up.")
    print(f"  {'HOST':<14} {'ADDRESS':<15} {'ROLE':<9} REACH WITH")
    for name, h in current.get("hosts", {}).items():
        print(f"  {name:<14} {h['address']:<15} {h['role']:<9} ssh -F {ssh_config} {name}")
    for name, h in current.get("far_ends", {}).items():
        print(f"  {name:<14} {h['address']:<15} {h['role']:<9} python -m lab exec {name} CMD")
    customer = current.get("customer")
    if customer:
        print(
            f"  {'customer':<14} {customer['address']:<15} {'customer':<9} "
            "python -m lab exec customer swaks ..."
        )
    for name, h in current.get("customers", {}).items():
        print(f"  {name:<14} {h['address']:<15} {'customer':<9} python -m lab exec {name} ...")
    dns = current.get("dns")
    if dns:
        print(f"  DNS {dns['address']}:{dns['port']}, zones: {', '.join(dns['zones'])}")
    if current.get("apt_proxy"):
        print(f"  apt proxy {current['apt_proxy']}")
    print(f"  state: {Path(current.get('ssh_config', '')).parent / 'state.json'}")
