"""Each host's relay config (``/etc/smg/smg.toml``, docs/configuration.md) from its inventory
values and the fleet's, as TOML data and as the TOML text the host gets (written by tomli-w)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import tomli_w

from deploykit.host import Gateway
from deploykit.paths import RSPAMD_PORT, SMTP_PORT, HostPaths
from deploykit.schema import LOCAL_TENANT, dkim_entry, tenant_networks


def nameservers(gateway: Gateway) -> list[str]:
    """What the host's services ask: its own validating unbound (``local_resolver``; DANE
    trusts AD only from there), else the inventory's resolvers (empty: /etc/resolv.conf)."""
    return ["127.0.0.1"] if gateway["local_resolver"] else list(gateway["resolvers"])


def relay_config(
    fleet_gateways: list[Gateway], gateway: Gateway, held_dkim: Collection[tuple[str, str]] = ()
) -> dict[str, Any]:
    """``/etc/smg/smg.toml`` for ``gateway`` as TOML data (see docs/configuration.md).
    ``held_dkim``: (domain, selector) keys not to sign with (their record is not in DNS)."""
    good = [g for g in fleet_gateways if g.role == "good"]
    bad = [g for g in fleet_gateways if g.role == "bad"]
    is_good = gateway.role == "good"
    # The fleet shares one private network (1:1 NAT: docs/deploy.md): a bad gateway sees the
    # good gateways' source addresses, and the good gateways reach it on its listen address.
    clients = customer_networks(gateway) if is_good else [_host_net(g.source_address) for g in good]
    config: dict[str, Any] = {
        "gateway": {
            "role": gateway.role,
            "hostname": gateway.fqdn,
            # Loopback too: local tools (the blacklist monitor's notifications) submit there.
            "listen": [_host_port(gateway.listen_address, SMTP_PORT), f"127.0.0.1:{SMTP_PORT}"],
            "source_address": gateway.source_address,
            "spool": HostPaths.SPOOL,
            "max_message_size": gateway["relay_max_message_size"],
            "client_networks": [*clients, "127.0.0.0/8"],
            "tls_cert": HostPaths.CERT,
            "tls_key": HostPaths.KEY,
            **_metrics_listen(gateway),
        },
        "dns": {
            "nameservers": [_host_port(ip, 53) for ip in nameservers(gateway)],
            "extra_public_networks": gateway["extra_public_networks"],
        },
        "virus": {"enabled": is_good, "clamd": f"unix:{HostPaths.CLAMD_SOCKET}"},
        "spam": {"enabled": is_good, "rspamd_url": f"http://127.0.0.1:{RSPAMD_PORT}"},
        "routing": {
            "bad_gateways": [_host_port(g.listen_address, SMTP_PORT) for g in bad]
            if is_good
            else [],
            "good_gateways": [g.source_address for g in good],
            "internal_ca": HostPaths.INTERNAL_CA,
        },
        "dkim": {"keys": _dkim_keys(gateway, held_dkim) if is_good else []},
        "tls_policy": {
            "ca_bundle": _ca_bundle(gateway),
            "rules": _tls_rules(gateway) + ([] if is_good else _tenant_tls_rules(good)),
        },
        "mta_sts": {"ca_bundle": _ca_bundle(gateway)},
        "blacklist": _blacklist(fleet_gateways, gateway),
        "delivery": {"destinations": [dict(e) for e in gateway["relay_destinations"]]},
    }
    if is_good and gateway["tenants"]:
        _add_tenants(config, gateway, held_dkim)
    if not is_good:
        # Only the good gateways send here, over TLS verified against the internal CA.
        config["gateway"]["require_tls_from_clients"] = True
    return _merge(config, gateway["relay_settings"])


def customer_networks(gateway: Gateway) -> list[str]:
    """Who may relay through a good gateway: the tenants' networks, else the old
    ``customer_networks`` (docs/deploy.md, migration)."""
    return tenant_networks(gateway["tenants"]) or list(gateway["customer_networks"])


def _add_tenants(
    config: dict[str, Any], gateway: Gateway, held: Collection[tuple[str, str]]
) -> None:
    """[[tenants]], [tenant_defaults] and the gateway's tenant keys (docs/tenants.md)."""
    section = config["gateway"]
    section["auth_networks"] = list(gateway["auth_networks"])
    if gateway["operations_mailbox"]:
        section["operations_mailbox"] = gateway["operations_mailbox"]
    config["tenant_defaults"] = dict(gateway["tenant_defaults"])
    config["tenants"] = [_tenant(t, held) for t in gateway["tenants"]] + [_local_tenant(gateway)]


def _tenant(tenant: Mapping[str, Any], held: Collection[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in tenant.items() if k != "dkim"}
    keys = []
    for item in tenant.get("dkim", []):
        entry = dkim_entry(item)
        if not isinstance(entry, str) and entry[:2] not in held:
            domain, selector, _ = entry
            key = HostPaths.dkim_key(domain, selector)
            keys.append({"domain": domain, "selector": selector, "key": key})
    out["dkim"] = keys
    return out


def _local_tenant(gateway: Gateway) -> dict[str, Any]:
    """Loopback as a customer of its own: the blacklist monitor's notices and Alertmanager
    submit on 127.0.0.1 as <tool>@<fqdn> (with [[tenants]] a client without one gets 530)."""
    return {"name": LOCAL_TENANT, "networks": ["127.0.0.1/32", "::1/128"],
            "domains": [gateway.fqdn]}  # fmt: skip


def _tenant_tls_rules(good: list[Gateway]) -> list[dict[str, Any]]:
    """The bad gateway delivers: it enforces the good gateways' tenants' forced-TLS rules."""
    rules: list[dict[str, Any]] = []
    for gateway in good:
        for tenant in gateway["tenants"] if isinstance(gateway["tenants"], list) else []:
            for rule in tenant.get("tls_rules", []) if isinstance(tenant, dict) else []:
                if isinstance(rule, dict) and dict(rule) not in rules:
                    rules.append(dict(rule))
    return rules


def _metrics_listen(gateway: Gateway) -> dict[str, Any]:
    """Loopback, unless the fleet has a monitoring host: then the fleet address, which the
    firewall opens to the monitoring host only (roles/firewall.py)."""
    port = gateway["relay_metrics_port"]
    if gateway["monitoring_host"] is None:
        return {"metrics_listen": f"127.0.0.1:{port}"}
    return {"metrics_listen": _host_port(gateway.listen_address, port), "metrics_public": True}


def _host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _host_net(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def _ca_bundle(gateway: Gateway) -> str:
    return HostPaths.PUBLIC_CA if gateway["public_ca_file"] else HostPaths.SYSTEM_CA_BUNDLE


def _dkim_keys(gateway: Gateway, held: Collection[tuple[str, str]]) -> list[dict[str, str]]:
    keys = []
    for item in gateway["dkim_domains"]:
        entry = dkim_entry(item)
        if not isinstance(entry, str) and entry[:2] not in held:
            domain, selector, _ = entry
            keys.append(
                {
                    "domain": domain,
                    "selector": selector,
                    "key": HostPaths.dkim_key(domain, selector),
                }
            )
    return keys


def _tls_rules(gateway: Gateway) -> list[dict[str, Any]]:
    return [dict(rule) for rule in gateway["tls_rules"] if isinstance(rule, dict)]


def _blacklist(gateways: list[Gateway], gateway: Gateway) -> dict[str, Any]:
    section: dict[str, Any] = {
        # What the DNSBLs list: the addresses the world sees.
        "addresses": list(dict.fromkeys(g.public_address for g in gateways)),
        "zones": [dict(z) for z in gateway["dnsbl_zones"] if isinstance(z, dict)],
        "state": HostPaths.BLACKLIST_STATE,
        "schedule": gateway["blacklist_schedule"],
        "timezone": gateway["blacklist_timezone"],
    }
    if gateway["operations_mailbox"]:
        section["operations_mailbox"] = gateway["operations_mailbox"]
        host, port = gateway["notify_via"]
        section["notify_via"] = _host_port(host, port)
    if gateway["ticket_url"]:
        section["ticket_url"] = gateway["ticket_url"]
    return section


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def to_toml(data: Mapping[str, Any]) -> str:
    """The relay config as TOML text.  TOML has no null: a key set to None is left out, as
    the relay then takes its default."""
    return tomli_w.dumps(_without_none(data))


def _without_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_without_none(v) for v in value]
    return value
