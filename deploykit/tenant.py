"""``python -m deploykit tenant INVENTORY list|show|suspend|resume [NAME] [--reason R]``: a
customer's state on every good gateway at once, over the inventory's SSH.

Suspension is per host (``<spool>/tenants.sqlite``): a customer suspended on one gateway still
sends through the others.  The runbook for a compromised customer (docs/tenants.md) is one
command: ``smg tenant suspend`` runs on each good gateway in parallel, each host's answer is
printed, and the exit status is 1 if any host could not be reached or refused.  The audit log
of each host names the operator (the SSH user behind ``sudo``) and the reason, to which this
command adds who ran it on the control machine.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from deploykit.fleet import Fleet
from deploykit.host import Gateway
from deploykit.paths import HostPaths
from deploykit.trace import run_over_ssh
from gateway.audit import operator

ACTIONS = ("list", "show", "suspend", "resume")
CHANGES = ("suspend", "resume")
SSH_TIMEOUT = 60.0


@dataclass(frozen=True)
class HostAnswer:
    host: str
    ok: bool
    output: str  # the command's stdout, or why it failed


def remote_command(action: str, name: str | None, reason: str | None, as_json: bool) -> list[str]:
    command = [HostPaths.SMG, "tenant", action, "--config", HostPaths.CONFIG]
    if as_json:
        command.append("--json")
    if name is not None:
        command.append(name)
    if action in CHANGES:
        command += ["--reason", f"{reason} (deploykit, by {operator()})"]
    return command


def _ask(gateway: Gateway, remote: list[str]) -> HostAnswer:
    stdout, error = run_over_ssh(gateway, remote, SSH_TIMEOUT)
    if stdout is None:
        return HostAnswer(gateway.name, False, error or "")
    return HostAnswer(gateway.name, True, stdout)


def on_fleet(
    fleet: Fleet, action: str, name: str | None, reason: str | None, as_json: bool = False
) -> list[HostAnswer]:
    """Run ``smg tenant ACTION`` on every good gateway (the hosts that take customers' mail),
    in parallel; the answers in inventory order."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    if action in CHANGES and not (reason or "").strip():
        raise ValueError(f"{action} needs --reason (it goes into each host's audit log)")
    if action != "list" and not name:
        raise ValueError(f"{action} needs the customer's NAME")
    remote = remote_command(action, name, reason, as_json)
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(fleet.good)))) as pool:
        return list(pool.map(lambda g: _ask(g, remote), fleet.good))


def render(answers: list[HostAnswer], as_json: bool) -> str:
    if as_json:
        out: dict[str, Any] = {}
        for answer in answers:
            try:
                out[answer.host] = json.loads(answer.output) if answer.ok else None
            except ValueError:
                out[answer.host] = None
        errors = {a.host: a.output for a in answers if not a.ok}
        return json.dumps({"hosts": out, "errors": errors}, indent=2) + "\n"
    lines = []
    for answer in answers:
        text = answer.output.rstrip("\n") if answer.ok else f"FAILED: {answer.output}"
        lines += [f"{answer.host}: {line}" for line in text.splitlines() or [""]]
    return "\n".join(lines) + "\n"
