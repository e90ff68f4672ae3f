"""tls: the host's certificate and key (the relay's STARTTLS), the fleet's internal CA (good to
bad gateway traffic is verified against it) and, where the inventory names one, the CA bundle
that far ends are verified against (forced TLS ``verify``, MTA-STS).  The forced-TLS table
itself is part of the relay config (deploykit/render.py renders it from ``tls_rules``)."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta

from deploykit.host import Gateway
from deploykit.paths import HostPaths
from roles import ops

USER = HostPaths.USER


def tls_files(gateway: Gateway) -> list[ops.Wanted]:
    public_ca = gateway["public_ca_file"]
    return [
        ops.Directory(HostPaths.TLS_DIR, "root", USER, "750"),
        ops.File(HostPaths.CERT, src=gateway["tls_cert_file"], group=USER),
        ops.File(HostPaths.KEY, src=gateway["tls_key_file"], user=USER, group=USER, mode="600"),
        ops.File(HostPaths.INTERNAL_CA, src=gateway["internal_ca_file"], group=USER),
        ops.File(HostPaths.PUBLIC_CA, src=public_ca, group=USER)
        if public_ca
        else ops.Absent(HostPaths.PUBLIC_CA),
    ]


@deploy("tls: certificate, key, CAs")
def apply(gateway: Gateway) -> list[OperationMeta]:
    """Returns the operations whose change the relay must be reloaded for."""
    return [ops.ensure(name="tls: certificate, key (0600 smg), CAs", items=tls_files(gateway))]
