"""inventories/production.py with its placeholders filled by documentation addresses, and a
second bad gateway: the shape of the real fleet (1:1 NAT, two good and two bad gateways).

Its group data is production's (``group_data`` is a link to ``inventories/group_data``); the
site group ``production_docs`` fills production's placeholders.  Certificates are relative to
the working directory: ``tests/unit/test_production_docs.py`` makes them from a test CA in a
temporary directory and loads this file there, through pyinfra and through deploykit.

Public addresses 198.51.100.21-24 and private ones 198.51.100.131-134 (the lab's "private"
half): strings only, nothing is dialled.
"""

from deploykit.inventory import validate_inventory


def _host(number: int) -> tuple[str, dict[str, str]]:
    name = f"otc-de-mta{number:02d}"
    return (
        name,
        {
            "fqdn": f"{name}.mms.t-systems-service.com",
            "public_address": f"198.51.100.{20 + number}",
            "listen_address": f"198.51.100.{130 + number}",
            "ssh_hostname": f"198.51.100.{130 + number}",
            "tls_cert_file": f"keys/pki/{name}.crt",
            "tls_key_file": f"keys/pki/{name}.key",
        },
    )


good = [_host(1), _host(2)]
bad = [_host(3), _host(4)]

production_docs = (
    ["otc-de-mta01", "otc-de-mta02", "otc-de-mta03", "otc-de-mta04"],
    {
        "ssh_networks": ["198.51.100.200/32"],
        "customer_networks": ["198.51.100.64/27", "2001:db8:99::/48"],
    },
)

validate_inventory(__file__, globals())
