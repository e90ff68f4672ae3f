"""``python -m deploykit trace INVENTORY``: follow a message across the fleet over SSH.

Every host of the inventory runs ``smg trace --records`` with the search (in parallel, over
the inventory's own SSH connection data, as the deploy); the control machine joins the records
into paths (gateway/trace.py) and asks the fleet again for the queue ids the hops named in their
``queued as`` replies (the next hop's lines), at most ``MAX_ROUNDS`` times.  A host that cannot
be asked is reported, the others still answer.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from deploykit.fleet import Fleet
from deploykit.host import Gateway
from deploykit.paths import HostPaths
from gateway.trace import MAX_ROUNDS, Criteria, paths, unknown_next_ids

SSH_TIMEOUT = 120  # seconds per host and round


def ssh_argv(gateway: Gateway, remote: list[str]) -> list[str]:
    """``ssh`` with the inventory's connection data (pyinfra's ``ssh_*`` keys)."""
    c = gateway.connection
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    if c.get("ssh_key"):
        argv += ["-i", str(c["ssh_key"])]
    if c.get("ssh_port"):
        argv += ["-p", str(c["ssh_port"])]
    if c.get("ssh_user"):
        argv += ["-l", str(c["ssh_user"])]
    if c.get("ssh_known_hosts_file"):
        argv += ["-o", f"UserKnownHostsFile={c['ssh_known_hosts_file']}"]
    if c.get("ssh_strict_host_key_checking"):
        argv += ["-o", f"StrictHostKeyChecking={c['ssh_strict_host_key_checking']}"]
    sudo = ["sudo", "-n"] if c.get("ssh_user") not in (None, "root") else []
    host = str(c.get("ssh_hostname") or gateway.public_address)
    return [*argv, host, shlex.join([*sudo, *remote])]


def remote_command(criteria: Criteria, since: str | None, until: str | None) -> list[str]:
    command = [HostPaths.SMG, "trace", "--records"]
    if criteria.message_id:
        command += ["--message-id", criteria.message_id]
    for queue_id in sorted(criteria.queue_ids):
        command += ["--queue-id", queue_id]
    if criteria.sender:
        command += ["--sender", criteria.sender]
    if criteria.recipient:
        command += ["--recipient", criteria.recipient]
    # --since=-1d: one word, or argparse takes "-1d" for an option
    command += [f"--since={since}"] if since else []
    command += [f"--until={until}"] if until else []
    return command


def run_over_ssh(
    gateway: Gateway, remote: list[str], timeout: float = SSH_TIMEOUT
) -> tuple[str | None, str | None]:
    """``(stdout, None)`` of ``remote`` on the host, or ``(None, why)`` when SSH failed, timed
    out or the command exited non-zero (the end of its stderr, else of its stdout)."""
    try:
        done = subprocess.run(ssh_argv(gateway, remote), capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    if done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip())[-300:]
        return None, f"exit {done.returncode}: {why}"
    return done.stdout, None


def _ask(gateway: Gateway, remote: list[str]) -> tuple[list[dict[str, Any]], str | None]:
    stdout, error = run_over_ssh(gateway, remote)
    if stdout is None:
        return [], f"{gateway.name}: {error}"
    records = []
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        record["host"] = gateway.name
        records.append(record)
    return records, None


def collect(
    fleet: Fleet, criteria: Criteria, since: str | None, until: str | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every host's records for ``criteria``, then for the next hops' queue ids."""
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    wanted = criteria
    with ThreadPoolExecutor(max_workers=min(16, len(fleet.gateways))) as pool:
        for _ in range(MAX_ROUNDS):
            remote = remote_command(wanted, since, until)
            asks = [pool.submit(_ask, g, remote) for g in fleet.gateways]
            for found, error in (ask.result() for ask in asks):
                records += found
                errors += [error] if error else []
            next_ids = unknown_next_ids(records) - set(wanted.queue_ids)
            if not next_ids:
                break
            wanted = replace(Criteria(), queue_ids=frozenset(next_ids))
    return records, errors


def trace(fleet: Fleet, criteria: Criteria, since: str | None, until: str | None) -> dict:
    records, errors = collect(fleet, criteria, since, until)
    result = paths(records)
    result["errors"] = errors
    return result
