"""The series the fleet dashboard and alerts name exist for every customer from the start: the
customers' DKIM keys in smg_dkim_key_usable, and each customer's counters at 0."""

from __future__ import annotations

from pathlib import Path

from gateway.config import parse_config
from gateway.dkim import write_new_key
from gateway.health import dkim_gauges
from gateway.intake.tenant_limits import declare_tenant_counters
from gateway.metrics import Metrics


def test_a_customers_own_dkim_keys_have_a_usable_gauge(tmp_path: Path) -> None:
    key, _ = write_new_key(tmp_path, "customer-a.example", "lab", "ed25519")
    config = parse_config(
        {
            "gateway": {"hostname": "gw.example.net", "role": "good"},
            "spam": {"enabled": False},
            "dkim": {"keys": [{"domain": "fleet.example", "selector": "s1", "key": str(key)}]},
            "tenants": [
                {
                    "name": "customer-a",
                    "networks": ["198.51.100.30/32"],
                    "domains": ["customer-a.example"],
                    "dkim": [{"domain": "customer-a.example", "selector": "lab", "key": str(key)}],
                },
                {
                    "name": "customer-b",
                    "networks": ["198.51.100.31/32"],
                    "domains": ["customer-b.example"],
                    "dkim": [
                        {"domain": "customer-b.example", "selector": "lab", "key": "/nonexistent"}
                    ],
                },
            ],
        }
    )
    assert dkim_gauges(config) == {
        (("domain", "fleet.example"), ("selector", "s1")): 1,
        (("domain", "customer-a.example"), ("selector", "lab")): 1,
        (("domain", "customer-b.example"), ("selector", "lab")): 0,
    }


async def test_quiet_customers_show_zero_not_nothing() -> None:
    metrics = Metrics()
    declare_tenant_counters(metrics, ["customer-a", "customer-b"])
    metrics.inc("smg_tenant_virus_total", tenant="customer-a")
    text = await metrics.render()
    assert 'smg_tenant_virus_total{tenant="customer-a"} 1' in text
    assert 'smg_tenant_virus_total{tenant="customer-b"} 0' in text
    assert 'smg_tenant_recipients_deferred_total{tenant="customer-b"} 0' in text
    assert 'smg_tenant_rate_limited_total{limit="messages_per_hour",tenant="customer-b"} 0' in text
    # declaring again (a reload) keeps what was counted
    declare_tenant_counters(metrics, ["customer-a", "customer-b"])
    assert metrics.value("smg_tenant_virus_total", tenant="customer-a") == 1
