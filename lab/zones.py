"""The lab's internet as DNS data: the zones `up` serves (texts without SOA/NS: dns.py adds them).

Names and addresses come from config.py so the zones and the hosts never disagree.
"""

from __future__ import annotations

from lab.config import (
    BRIDGE_ADDR,
    CUSTOMER,
    DNSBL_ZONE,
    DOMAIN,
    FAR_ENDS,
    GATEWAYS,
    REPO_DIR,
    host_by_name,
)

DEFAULT_TTL = 30  # short: tests edit zones and the relay caches answers for the TTL

MX_TLS = host_by_name("mx-tls")
MX_PLAIN = host_by_name("mx-plain")

# Far-end domains: mail for them goes to the far-end Postfix named here.
PARTNER_DOMAINS = {"partner-tls.example": MX_TLS, "partner-plain.example": MX_PLAIN}
# Customer (sender) domains and what makes them "resolve" for the sender domain check.
CUSTOMER_DOMAINS = {
    "customer-a.example": "MX and A",
    "customer-b.example": "A only (implicit MX)",
}
NO_RECORDS_DOMAIN = "no-records.example"  # exists (SOA/NS) but has no MX, A or AAAA
NULL_MX_DOMAIN = "null-mx.example"  # RFC 7505 "MX 0 ." : accepts no mail
SPF_NAME = "spf.lab.example"  # the fleet's SPF record, in the lab zone
NXDOMAIN_EXAMPLE = "does-not-exist.example"  # in no zone: the root zone answers NXDOMAIN
# The same two cases under a domain of customer-a's (its tenant owns .customer-a.example), so
# the sender domain check is what answers, not the sender binding (a domain of no customer).
CUSTOMER_NO_RECORDS = "quiet.customer-a.example"  # a TXT record only: no MX, A or AAAA
CUSTOMER_NXDOMAIN = "gone.customer-a.example"  # no such name in customer-a.example

# DNSSEC and DANE (issue 14): knot signs these zones; the gateways' unbound trusts their keys.
# partner-tls publishes a TLSA record for mx-tls's key (once mx-tls has its certificate:
# tlsa_zone), partner-dane-bad points at mx-tls too but with a TLSA record for another key,
# partner-plain is signed without TLSA.  partner-slow's MX is an address where nothing answers
# (the in-session probe times out).  partner-tls asks for TLS reports (RFC 8460).
DANE_BAD_DOMAIN = "partner-dane-bad.example"
SLOW_DOMAIN = "partner-slow.example"
SLOW_ADDRESS = "198.51.100.59"  # no host: connections to it time out
SIGNED_ZONES = ("partner-tls.example", "partner-plain.example", DANE_BAD_DOMAIN)
WRONG_TLSA = "3 1 1 " + "0" * 63 + "1"  # names no key
TLSRPT_MAILBOX = "tlsrpt@partner-tls.example"


# The kit's lab DKIM keys' records (python -m deploykit dkim-keys inventories/lab.py): served
# in the customer zones, so the far ends can verify what the gateways sign.
DKIM_RECORDS = REPO_DIR / "keys" / "lab" / "dns-records.txt"


def dkim_records(domain: str) -> str:
    """The zone-file lines of ``dns-records.txt`` for ``domain``'s selectors ("" if none)."""
    if not DKIM_RECORDS.is_file():
        return ""
    lines = [
        line
        for line in DKIM_RECORDS.read_text().splitlines()
        if line and not line.startswith(";") and line.split()[0].endswith(f"._domainkey.{domain}.")
    ]
    return "".join(f"{line}\n" for line in lines)


def far_end_fqdn(domain: str) -> str:
    return f"mx.{domain}"


def lab_zone() -> str:
    lines = [f"ns1 A {BRIDGE_ADDR}", f"apt A {BRIDGE_ADDR}"]
    lines += [f"{h.name} A {h.address}" for h in (*GATEWAYS, *FAR_ENDS, CUSTOMER)]
    # the fleet's SPF record (the lab inventory's spf_domain; customers would include: it)
    lines += [f'{SPF_NAME.split(".")[0]} TXT "{spf_all_gateways()}"']
    return "\n".join(lines) + "\n"


def reverse_zone_name() -> str:
    return "100.51.198.in-addr.arpa"


def reverse_zone() -> str:
    """PTRs matching the forward names, so forward-confirmed reverse DNS holds in the lab."""
    ptr = {BRIDGE_ADDR: f"ns1.{DOMAIN}."}
    ptr.update({h.address: f"{h.fqdn}." for h in GATEWAYS})
    ptr.update({mx.address: f"{far_end_fqdn(d)}." for d, mx in PARTNER_DOMAINS.items()})
    ptr[CUSTOMER.address] = "mail.customer-a.example."
    return "".join(f"{a.rsplit('.', 1)[1]} PTR {name}\n" for a, name in ptr.items())


def partner_zone(domain: str, tlsa: str | None = None) -> str:
    mx = PARTNER_DOMAINS[domain]
    text = f"@ MX 10 mx.{domain}.\nmx A {mx.address}\n"
    if tlsa:
        text += f"_25._tcp.mx TLSA {tlsa}\n"
    if domain == "partner-tls.example":
        text += f'_smtp._tls TXT "v=TLSRPTv1; rua=mailto:{TLSRPT_MAILBOX}"\n'
    return text


def tlsa_for(cert_pem: bytes) -> str:
    """A DANE-EE record (3 1 1: SHA-256 of the key) for a PEM certificate."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"3 1 1 {hashlib.sha256(spki).hexdigest()}"


def spf_all_gateways() -> str:
    return "v=spf1 " + " ".join(f"ip4:{h.address}" for h in GATEWAYS) + " -all"


def default_zones() -> dict[str, str]:
    zones = {
        DOMAIN: lab_zone(),
        reverse_zone_name(): reverse_zone(),
        "customer-a.example": (
            f"@ MX 10 mail.customer-a.example.\n@ A {CUSTOMER.address}\n"
            f'mail A {CUSTOMER.address}\n@ TXT "{spf_all_gateways()}"\n'
            f'{CUSTOMER_NO_RECORDS.split(".")[0]} TXT "no mail host here"\n'
        ),
        "customer-b.example": f"@ A {CUSTOMER.address}\n",
        # customer-c sends over AUTH; its NDRs go to the customer's server like b's
        "customer-c.example": f'@ A {CUSTOMER.address}\n@ TXT "{spf_all_gateways()}"\n',
        NO_RECORDS_DOMAIN: "",
        NULL_MX_DOMAIN: "@ MX 0 .\n",
        # The DNSBL: empty but for the conventional test entry 127.0.0.2 (always listed).
        DNSBL_ZONE: '2.0.0.127 A 127.0.0.2\n2.0.0.127 TXT "test entry"\n',
    }
    zones.update({d: partner_zone(d) for d in PARTNER_DOMAINS})
    zones[DANE_BAD_DOMAIN] = (
        f"@ MX 10 mx.{DANE_BAD_DOMAIN}.\nmx A {MX_TLS.address}\n_25._tcp.mx TLSA {WRONG_TLSA}\n"
    )
    zones[SLOW_DOMAIN] = f"@ MX 10 mx.{SLOW_DOMAIN}.\nmx A {SLOW_ADDRESS}\n"
    for domain in CUSTOMER_DOMAINS:
        zones[domain] += dkim_records(domain)
    return zones
