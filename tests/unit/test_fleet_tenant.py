"""``python -m deploykit tenant``: the command each good gateway runs, the refusals before any
SSH, and the rendering of the hosts' answers (the lab test runs it for real)."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import pytest

from deploykit import tenant


def test_the_remote_command_carries_the_reason_and_who_ran_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    command = tenant.remote_command("suspend", "customer-a", "ticket 42; compromised", False)
    assert command[:5] == ["/opt/smg/venv/bin/smg", "tenant", "suspend", "--config",
                           "/etc/smg/smg.toml"]  # fmt: skip
    assert command[-2:] == ["--reason", "ticket 42; compromised (deploykit, by alice)"]
    assert "'ticket 42; compromised (deploykit, by alice)'" in shlex.join(command)
    assert "--json" in tenant.remote_command("list", None, None, True)


@pytest.mark.parametrize(
    ("action", "name", "reason", "why"),
    [
        ("suspend", "customer-a", "", "needs --reason"),
        ("resume", "customer-a", None, "needs --reason"),
        ("show", None, None, "needs the customer's NAME"),
        ("delete", "customer-a", "x", "unknown action"),
    ],
)
def test_refused_before_any_ssh(
    action: str, name: str | None, reason: str | None, why: str
) -> None:
    fleet = SimpleNamespace(good=())  # no host would be asked anyway
    with pytest.raises(ValueError, match=why):
        tenant.on_fleet(fleet, action, name, reason)  # type: ignore[arg-type]


def test_answers_rendered_per_host() -> None:
    answers = [
        tenant.HostAnswer("otc-de-mta01", True, "customer-a: suspended\n"),
        tenant.HostAnswer("otc-de-mta02", False, "exit 255: ssh: connect refused"),
    ]
    assert tenant.render(answers, False) == (
        "otc-de-mta01: customer-a: suspended\n"
        "otc-de-mta02: FAILED: exit 255: ssh: connect refused\n"
    )
    as_json = json.loads(
        tenant.render([tenant.HostAnswer("otc-de-mta01", True, '{"suspended": true}')], True)
    )
    assert as_json == {"hosts": {"otc-de-mta01": {"suspended": True}}, "errors": {}}
