"""Data for every gateway of the fleet (production values).

pyinfra group data: every top-level name is an inventory key (docs/deploy.md lists them all).
Layers, later ones win: this file < good.py / bad.py < the site group (``lab`` in lab.py) <
the host's own entry in the inventory file.  A change request is an edit here (or in good.py /
bad.py), then the deploy; the deploy refuses the whole inventory if any entry is wrong.
"""

# Packages: the Debian mirror the hosts install from, and an optional HTTP proxy for apt.
debian_mirror = "http://deb.debian.org/debian"
debian_security_mirror = "http://deb.debian.org/debian-security"
apt_proxy = None
timezone = "Europe/Berlin"

# Empty: the relay and rspamd use the hosts' /etc/resolv.conf.
resolvers = []

# SSH into the gateways: the firewall allows port 22 only from here.  No default: name the
# networks of the bastion / jump hosts and the deploy's control machine.
ssh_networks = ["REPLACE-ME/ssh-networks"]

# ClamAV signatures: freshclam fetches them from this mirror.  None: the hosts get the
# signature set the kit ships (clamav_signatures_dir) and freshclam stays off (labs, offline).
clamav_mirror = "https://database.clamav.net"

# TLS: the fleet's internal CA (good-to-bad traffic is verified against it).  Each host's
# certificate and key are named in its entry in production.py.
internal_ca_file = "keys/pki/internal-ca.crt"

# Forced TLS per (sender domain, recipient domain): "example.com", ".example.com" (its
# subdomains) or "*"; level "encrypt" (TLS >= 1.2) or "verify" (valid chain and MX name);
# on_failure "hold" (keep and retry) or "reject" (NDR at once).  Never in the clear.
# Example: {"sender": "customer.example", "recipient": "partner.example",
#           "level": "verify", "on_failure": "hold"}
tls_rules = []

# Blacklist monitoring (service description: daily at 5am; the FMB is informed).
operations_mailbox = "DD-OTC-SDM@telekom.de"  # FMB Change-OpenTelekomCloud
notify_via = "127.0.0.1:25"  # the monitoring host's own relay
ticket_url = None
blacklist_monitor_hosts = ["otc-de-mta01"]
blacklist_schedule = "*-*-* 05:00:00"
blacklist_timezone = "Europe/Berlin"
# Each entry: zone, and optionally name, major, ipv6, removal_url, removal_mail (unset keys
# come from the relay's catalogue of known lists, docs/blacklist.md).
dnsbl_zones = [
    {"zone": "zen.spamhaus.org"},
    {"zone": "bl.spamcop.net"},
    {"zone": "b.barracudacentral.org"},
    {"zone": "psbl.surriel.com"},
    {"zone": "bl.mailspike.net"},
    {"zone": "ix.dnsbl.manitu.net"},
]

# The relay.
# The fleet's SPF record (customers include: it), checked by python -m deploykit dns-check;
# None until the name is agreed with the DNS team.
spf_domain = None
dkim_unpublished_ok = False  # sign only with keys whose record is in DNS (docs/dkim.md)

relay_max_message_size = "25MiB"
relay_metrics_port = 9525
# Per-destination shaping (docs/queue.md, "Per-destination shaping"): limits per relay process
# for the big mailbox providers (the default for every other domain is 20 at a time, no rate
# limit).  Each entry: domains, and concurrency and/or rate ("100/s", "600/m").
relay_destinations = [
    {"domains": ["gmail.com", "googlemail.com"], "concurrency": 40},
    {"domains": ["outlook.com", "hotmail.com", "live.com", "msn.com"], "concurrency": 40},
    {"domains": ["yahoo.com", "aol.com"], "concurrency": 20, "rate": "50/s"},
    {"domains": ["t-online.de"], "concurrency": 10, "rate": "20/s"},
    {"domains": ["gmx.de", "gmx.net", "web.de"], "concurrency": 20},
]

# Monitoring (docs/monitoring.md): Prometheus and Alertmanager on the monitor gateway, node
# exporter everywhere; alerts mail operations_mailbox through the monitoring host's relay.
monitoring_host = "otc-de-mta01"
monitoring_retention = "30d"
scrape_interval = "30s"
alert_for = {}  # the shipped for: windows
