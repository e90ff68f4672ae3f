"""tls: the host's certificate and key (the relay's STARTTLS), the fleet's internal CA (good to
bad gateway traffic is verified against it) and, where the inventory names one, the CA bundle
that far ends are verified against (forced TLS ``verify``, MTA-STS).  The forced-TLS table
itself is part of the relay config (roles/relay.py renders it from ``tls_rules``)."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

from gateway.inventory import Gateway, HostPaths

USER = HostPaths.USER


@deploy("tls: certificate, key, internal CA")
def apply(gateway: Gateway) -> list[OperationMeta]:
    """Returns the operations whose change the relay must be reloaded for."""
    files.directory(
        name=f"directory {HostPaths.TLS_DIR}",
        path=HostPaths.TLS_DIR,
        user="root",
        group=USER,
        mode="750",
    )
    changes = [
        files.put(
            name="tls: the host's certificate",
            src=gateway["tls_cert_file"],
            dest=HostPaths.CERT,
            user="root",
            group=USER,
            mode="644",
        ),
        files.put(
            name="tls: the host's private key (0600, smg)",
            src=gateway["tls_key_file"],
            dest=HostPaths.KEY,
            user=USER,
            group=USER,
            mode="600",
        ),
        files.put(
            name="tls: the fleet's internal CA",
            src=gateway["internal_ca_file"],
            dest=HostPaths.INTERNAL_CA,
            user="root",
            group=USER,
            mode="644",
        ),
    ]
    public_ca = gateway["public_ca_file"]
    if public_ca:
        changes.append(
            files.put(
                name="tls: the CA bundle for far ends",
                src=public_ca,
                dest=HostPaths.PUBLIC_CA,
                user="root",
                group=USER,
                mode="644",
            )
        )
    else:
        changes.append(
            files.file(name="tls: no extra CA bundle", path=HostPaths.PUBLIC_CA, present=False)
        )
    return changes
