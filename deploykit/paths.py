"""Where things live on a gateway host, and the ports the roles and the relay config agree on."""

from __future__ import annotations

RSPAMD_PORT = 11333
SMTP_PORT = 25


class HostPaths:
    """Paths on the gateway hosts; the roles and the rendered relay config agree on them."""

    USER = "smg"
    ETC = "/etc/smg"
    CONFIG = "/etc/smg/smg.toml"
    TLS_DIR = "/etc/smg/tls"
    CERT = "/etc/smg/tls/host.crt"
    KEY = "/etc/smg/tls/host.key"
    INTERNAL_CA = "/etc/smg/tls/internal-ca.crt"
    PUBLIC_CA = "/etc/smg/tls/public-ca.crt"
    DKIM_DIR = "/etc/smg/dkim"
    SPOOL = "/var/spool/smg"
    STATE_DIR = "/var/lib/smg"
    BLACKLIST_STATE = "/var/lib/smg/blacklist.sqlite"
    OPT = "/opt/smg"
    VENV = "/opt/smg/venv"
    WHEELHOUSE = "/opt/smg/wheelhouse"
    SMG = "/opt/smg/venv/bin/smg"
    CLAMD_SOCKET = "/run/clamav/clamd.ctl"
    SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

    @staticmethod
    def dkim_key(domain: str, selector: str) -> str:
        return f"/etc/smg/dkim/{domain}.{selector}.key"
