"""rspamd: the spam check, on loopback only (worker-normal on 127.0.0.1:11333, the controller
on 127.0.0.1:11334), no proxy and no fuzzy workers, no fuzzy hashes sent out, DNS through the
resolvers named in the inventory (else the host's resolver)."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import systemd

from deploykit.host import Gateway
from deploykit.paths import RSPAMD_PORT
from deploykit.render import nameservers
from roles import ops
from roles.render import render

PACKAGES = ["rspamd"]
CONTROLLER_PORT = 11334


def config_files(gateway: Gateway) -> dict[str, str]:
    """Path under /etc/rspamd -> content.  override.d replaces Debian's bind_socket (local.d
    would add to it)."""
    off = render("rspamd/worker-off.inc.j2")
    resolvers = [f"{ip}:53" for ip in nameservers(gateway)]
    return {
        "override.d/worker-normal.inc": render(
            "rspamd/worker-normal.inc.j2", port=RSPAMD_PORT, count=1
        ),
        "override.d/worker-controller.inc": render(
            "rspamd/worker-controller.inc.j2", port=CONTROLLER_PORT
        ),
        "override.d/worker-proxy.inc": off,
        "override.d/worker-fuzzy.inc": off,
        "local.d/fuzzy_check.conf": render("rspamd/fuzzy_check.conf.j2"),
        "local.d/options.inc": render("rspamd/options.inc.j2", resolvers=resolvers),
    }


@deploy("rspamd: loopback only")
def apply(gateway: Gateway) -> None:
    conf = ops.ensure(
        name="rspamd: loopback workers, no fuzzy, DNS",
        items=[ops.File(f"/etc/rspamd/{p}", t) for p, t in config_files(gateway).items()],
    )
    systemd.service(
        name="rspamd: enabled and running", service="rspamd.service", running=True, enabled=True
    )
    # A restart, not a reload: the workers' sockets change with the config.
    systemd.service(
        name="rspamd: restart for the changed config",
        service="rspamd.service",
        running=None,  # only the restart: never a start as well
        restarted=True,
        _if=conf.did_change,
    )
