"""Data for the good gateways: they take the customers' mail, sign it and send the ham."""

# The customers (issue 11, docs/tenants.md): each one's networks, sender domains (".d": every
# subdomain of d), AUTH users (password_hash only: smg tenant hash-password; never clear text),
# limits (overrides of tenant_defaults), DKIM keys and forced-TLS rules for its own domains:
# {"name": "customer-a", "networks": ["10.20.0.0/16"], "domains": ["customer-a.example"],
#  "auth": [{"user": "relay@customer-a.example", "password_hash": "$scrypt$..."}],
#  "limits": {"messages_per_hour": 1000},
#  "dkim": [{"domain": "customer-a.example", "selector": "smg2026", "algorithm": "rsa"}],
#  "tls_rules": [{"sender": "customer-a.example", "recipient": "partner.example",
#                 "level": "verify", "on_failure": "hold"}]}
# Keys per customer domain: python -m deploykit dkim-keys INVENTORY.
tenants = []
tenant_defaults = {}  # the relay's [tenant_defaults] (docs/configuration.md) as they are
auth_networks = []  # may connect without a tenant network, must AUTH as a customer's user

# The old key (before tenants): who may relay, without binding senders to customers.  Replaced
# by tenants (docs/deploy.md, migration); a placeholder until the real ranges are given.
customer_networks = ["REPLACE-ME/customer-networks"]

# DKIM signing per sender domain (requested via Cloud Handling Support).  Each entry:
# {"domain": "customer.example", "selector": "smg2025", "algorithm": "rsa"}   (or "ed25519")
# The key is made once on the control machine: python -m deploykit dkim-keys INVENTORY
# (keys/<domain>/<selector>.key; the TXT records for the customer in keys/dns-records.txt).
dkim_domains = []
