"""Production: the Secure Mail Gateway fleet of the Open Telekom Cloud.

    pyinfra inventories/production.py deploy.py --dry     # what would change
    pyinfra inventories/production.py deploy.py -y        # do it

Hosts are in ``good`` or ``bad``; the fleet's data is in ``group_data/`` (all.py, good.py,
bad.py).  Each host's entry holds what is its own: the public address the relay listens on and
sends from, its name, its certificate.  ``REPLACE-ME`` marks what is not known yet: the
inventory refuses to load (and the deploy to start) until it is set.  docs/deploy.md lists
every key.
"""

from deploykit.inventory import validate_inventory

good = [
    (
        "otc-de-mta01",
        {
            # Assumed by analogy with otc-de-mta03's name: confirm before the first deploy.
            "fqdn": "otc-de-mta01.mms.t-systems-service.com",
            "public_address": "REPLACE-ME: otc-de-mta01's public IPv4 or IPv6 address",
            "ssh_hostname": "otc-de-mta01.mms.t-systems-service.com",
            "tls_cert_file": "keys/pki/otc-de-mta01.crt",
            "tls_key_file": "keys/pki/otc-de-mta01.key",
        },
    ),
    (
        "otc-de-mta02",
        {
            "fqdn": "otc-de-mta02.mms.t-systems-service.com",
            "public_address": "REPLACE-ME: otc-de-mta02's public IPv4 or IPv6 address",
            "ssh_hostname": "otc-de-mta02.mms.t-systems-service.com",
            "tls_cert_file": "keys/pki/otc-de-mta02.crt",
            "tls_key_file": "keys/pki/otc-de-mta02.key",
        },
    ),
]

bad = [
    (
        "otc-de-mta03",
        {
            # The bad gateway named in the service description.
            "fqdn": "otc-de-mta03.mms.t-systems-service.com",
            "public_address": "REPLACE-ME: otc-de-mta03's public IPv4 or IPv6 address",
            "ssh_hostname": "otc-de-mta03.mms.t-systems-service.com",
            "tls_cert_file": "keys/pki/otc-de-mta03.crt",
            "tls_key_file": "keys/pki/otc-de-mta03.key",
        },
    ),
]

# Last: refuse a broken inventory before pyinfra connects to any host.
validate_inventory(__file__, globals())
