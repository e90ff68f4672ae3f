"""Data for the good gateways: they take the customers' mail, sign it and send the ham."""

# Who may relay through the good gateways: the Open Telekom Cloud customer networks.
# Placeholder until the real ranges are given; the deploy refuses to run with it.
customer_networks = ["REPLACE-ME/customer-networks"]

# DKIM signing per sender domain (requested via Cloud Handling Support).  Each entry:
# {"domain": "customer.example", "selector": "smg2025", "algorithm": "rsa"}   (or "ed25519")
# The key is made once on the control machine: python -m deploykit dkim-keys INVENTORY
# (keys/<domain>/<selector>.key; the TXT records for the customer in keys/dns-records.txt).
dkim_domains = []
