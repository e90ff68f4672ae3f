"""build_services: what smg serve and smg explain share, and what a reload keeps."""

from __future__ import annotations

from typing import Any

from gateway.config import Config, parse_config
from gateway.services import build_services


def config(role: str = "good", **sections: Any) -> Config:
    data: dict[str, Any] = {
        "gateway": {"hostname": "gw.example.net", "role": role},
        "virus": {"clamd": "tcp:127.0.0.1:3310"},
        "spam": {"rspamd_url": "http://127.0.0.1:11333"},
        "routing": {"bad_gateways": ["127.0.0.31"], "good_gateways": ["127.0.0.21"]},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data)


def test_the_features_that_are_on_get_their_client() -> None:
    good = build_services(config("good"))
    assert good.resolver is not None and good.tls_policy is not None
    assert good.clamd is not None and good.rspamd is not None and good.dkim is not None
    assert good.spool is None  # a dry run: nothing can be queued
    bad = build_services(config("bad"))
    assert bad.clamd is not None
    assert bad.rspamd is None and bad.dkim is None  # trusts the verdict, never signs
    off = build_services(config("good", virus={"enabled": False}, spam={"enabled": False}))
    assert off.clamd is None and off.rspamd is None


def test_a_reload_reuses_unchanged_scanner_clients_and_keeps_tls_state() -> None:
    before = build_services(config("good"))
    same = build_services(config("good"), previous=before)
    assert same.clamd is before.clamd and same.rspamd is before.rspamd
    assert same.resolver is not before.resolver
    assert same.tls_policy is not None and before.tls_policy is not None
    assert same.tls_policy.failures is before.tls_policy.failures
    changed = build_services(
        config("good", virus={"timeout": "5s"}, spam={"timeout": "5s"}), previous=same
    )
    assert changed.clamd is not same.clamd and changed.rspamd is not same.rspamd
