"""Which TLS a delivery needs: forced-TLS rules, then MTA-STS, else opportunistic STARTTLS.

The service keys forced TLS on the sender domain and the recipient domain together.  A rule in
``tls_policy.rules`` has a sender pattern and a recipient pattern; each pattern is

- an exact domain (``example.com``: that domain only),
- a subdomain pattern (``.example.com``: every domain below example.com, NOT example.com itself,
  as in Postfix's tables), or
- ``*`` (any domain, including the null sender's empty domain).

Precedence (docs/tls.md): the most specific rule wins.  A pattern ranks exact > subdomain > ``*``;
among subdomain patterns the longer suffix (more labels) ranks higher.  Rules are compared by
the recipient pattern's rank first, then the sender pattern's rank.  Two patterns that match the
same domain always have different ranks, and two rules with the same pair of patterns are a
configuration error, so exactly one rule wins.

Delivery (``gateway/delivery.py``) asks :meth:`TlsPolicy.requirement` per (sender domain,
recipient domain) and enforces the :class:`TlsRequirement` it gets: never cleartext under
``encrypt``/``verify``, next MX on a TLS failure, then hold or reject.  It records TLS failures
in :attr:`TlsPolicy.failures`, which the intake's RCPT rule (``tls_known_failure``) reads to
refuse a recipient at once where a ``reject`` rule applies and TLS to it just failed.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.mta_sts import MtaSts, MtaStsPolicy, StateFile, mx_matches

if TYPE_CHECKING:
    from gateway.config import Config, ConfigProblem, TlsRule

log = logging.getLogger("smg.tls")

OPPORTUNISTIC, ENCRYPT, VERIFY = "opportunistic", "encrypt", "verify"
FAILURES_STATE = "tls-failures.json"  # in the spool directory, shared by the workers
MTA_STS_STATE = "mta-sts.json"
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


# --- patterns -------------------------------------------------------------------------------


def normalize_domain(domain: str) -> str:
    """Lower-case A-label form without a trailing dot; "" stays "" (the null sender)."""
    name = domain.strip().rstrip(".").lower()
    try:
        return name.encode("idna").decode("ascii") if name else ""
    except UnicodeError:
        return name


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid rule pattern, or None if it is."""
    if pattern == "*":
        return None
    if not isinstance(pattern, str) or not pattern.strip():
        return 'expected a domain, ".domain" (its subdomains) or "*", got an empty pattern'
    body = pattern.strip().lower()
    subdomains = body.startswith(".")
    labels = (body[1:] if subdomains else body).rstrip(".").split(".")
    if not all(_LABEL.match(label) for label in labels):
        return f'not a domain, ".domain" or "*": {pattern!r}'
    if not subdomains and len(labels) < 2:
        return f"an exact domain needs at least two labels: {pattern!r} (use .{body} for all below)"
    return None


def pattern_rank(pattern: str) -> tuple[int, int]:
    """How specific a pattern is: exact (2, labels) > subdomain (1, labels) > ``*`` (0, 0)."""
    if pattern == "*":
        return (0, 0)
    if pattern.startswith("."):
        return (1, pattern.count("."))
    return (2, pattern.count(".") + 1)


def pattern_matches(pattern: str, domain: str) -> bool:
    """Does a (normalized) rule pattern match a (normalized) domain?"""
    if pattern == "*":
        return True
    if pattern.startswith("."):
        return domain.endswith(pattern) and len(domain) > len(pattern)
    return domain == pattern


def normalize_pattern(pattern: str) -> str:
    text = pattern.strip().lower()
    if text == "*":
        return text
    if text.startswith("."):
        return "." + normalize_domain(text[1:])
    return normalize_domain(text)


@dataclass(frozen=True)
class CompiledRule:
    index: int  # position in tls_policy.rules, for messages
    sender: str
    recipient: str
    level: str
    on_failure: str

    @property
    def rank(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return (pattern_rank(self.recipient), pattern_rank(self.sender))

    @property
    def name(self) -> str:
        return f"tls_policy.rules[{self.index}] sender={self.sender} recipient={self.recipient}"

    def matches(self, sender_domain: str, recipient_domain: str) -> bool:
        return pattern_matches(self.sender, sender_domain) and pattern_matches(
            self.recipient, recipient_domain
        )


def compile_rules(rules: list[TlsRule]) -> list[CompiledRule]:
    """Normalized rules, most specific first (so the first match wins)."""
    compiled = [
        CompiledRule(
            index,
            normalize_pattern(rule.sender),
            normalize_pattern(rule.recipient),
            rule.level,
            rule.on_failure,
        )
        for index, rule in enumerate(rules)
    ]
    return sorted(compiled, key=lambda rule: rule.rank, reverse=True)


def check_rules(config: Config) -> list[ConfigProblem]:
    """Config cross-check: valid patterns, and no two rules for the same pair of patterns."""
    from gateway.config import ConfigProblem  # config imports this check lazily

    problems: list[ConfigProblem] = []
    seen: dict[tuple[str, str], int] = {}
    for index, rule in enumerate(config.tls_policy.rules):
        bad = False
        for key in ("sender", "recipient"):
            why = pattern_problem(getattr(rule, key))
            if why:
                problems.append(ConfigProblem(f"tls_policy.rules[{index}].{key}", why))
                bad = True
        if bad:
            continue
        pair = (normalize_pattern(rule.sender), normalize_pattern(rule.recipient))
        if pair in seen:
            problems.append(
                ConfigProblem(
                    f"tls_policy.rules[{index}]",
                    f"same sender {pair[0]!r} and recipient {pair[1]!r} as "
                    f"tls_policy.rules[{seen[pair]}]: which one applies would be ambiguous",
                )
            )
        seen.setdefault(pair, index)
    return problems


# --- the requirement ------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsRequirement:
    """What one delivery needs (docs/architecture.md, "The contracts between rooms").

    ``level``: ``opportunistic`` (STARTTLS when offered, any certificate, cleartext otherwise),
    ``encrypt`` (STARTTLS with TLS >= 1.2 required, any certificate) or ``verify`` (also a chain
    valid against ``ca_bundle`` and a certificate name matching the MX host name).
    ``on_failure``: ``hold`` or ``reject`` when no MX meets the level (None when opportunistic).
    ``mx_patterns``: MTA-STS ``mx`` patterns; an MX matching none of them is not used.
    ``testing``: MTA-STS ``testing`` mode: delivered opportunistically, and what ``enforce``
    would have refused is logged (``mx_patterns`` are then for the log only).
    """

    level: str = OPPORTUNISTIC
    on_failure: str | None = None
    source: str = "default"
    mx_patterns: tuple[str, ...] = ()
    ca_bundle: Path | None = None
    testing: bool = False

    @property
    def requires_tls(self) -> bool:
        """True when cleartext is forbidden (encrypt or verify)."""
        return self.level in (ENCRYPT, VERIFY)

    def mx_listed(self, host: str) -> bool:
        """Does an MTA-STS pattern name this MX (True when there are no patterns)?"""
        return not self.mx_patterns or any(mx_matches(p, host) for p in self.mx_patterns)

    def mx_allowed(self, host: str) -> bool:
        """May delivery use this MX at all?  Only enforced MTA-STS policies exclude MX hosts."""
        return self.testing or self.mx_listed(host)

    def ssl_context(self) -> ssl.SSLContext:
        """The client context for STARTTLS under this requirement.

        Pass the MX host NAME (not its address) as ``server_hostname``: under ``verify`` the
        certificate must name it.  Under opportunistic/encrypt the certificate is not checked
        during the handshake; :func:`describe_tls` reports afterwards whether it would verify.
        """
        if self.level == VERIFY:
            ctx = ssl.create_default_context(cafile=str(self.ca_bundle) if self.ca_bundle else None)
            ctx.check_hostname = True
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.requires_tls:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def describe(self) -> str:
        text = f"{self.level}"
        if self.on_failure:
            text += f", on failure {self.on_failure}"
        if self.mx_patterns:
            text += f", mx {' '.join(self.mx_patterns)}"
        if self.testing:
            text += " (MTA-STS testing: not enforced)"
        return f"{text} ({self.source})"


def requirement_for_mta_sts(policy: MtaStsPolicy, ca_bundle: Path) -> TlsRequirement:
    """RFC 8461: enforce -> verified TLS to a listed MX, held on failure; testing -> logged."""
    source = f"mta-sts {policy.mode} id={policy.policy_id}"
    if policy.mode == "enforce":
        return TlsRequirement(VERIFY, "hold", source, tuple(policy.mx), ca_bundle)
    if policy.mode == "testing":
        return TlsRequirement(OPPORTUNISTIC, None, source, tuple(policy.mx), ca_bundle, True)
    return TlsRequirement(OPPORTUNISTIC, None, source, (), ca_bundle)


# --- recent TLS failures --------------------------------------------------------------------


_STRICTNESS = {OPPORTUNISTIC: 0, ENCRYPT: 1, VERIFY: 2}


class TlsFailureCache:
    """Recent TLS failures per destination (recipient domain), shared by delivery and intake.

    Delivery calls :meth:`record_failure` when no MX of a domain met a required TLS level and
    :meth:`record_success` when TLS at some level worked; the intake's ``tls_known_failure``
    rule asks :meth:`recent_failure`.  Levels matter: a failure under ``encrypt`` (no STARTTLS)
    means ``verify`` fails too, but a failure under ``verify`` (a bad certificate) says nothing
    about ``encrypt``; likewise a success under ``encrypt`` does not clear a ``verify`` failure.
    Bounded to ``max_entries`` domains; entries expire after ``ttl`` seconds (wall clock).
    With a ``state`` file (the relay passes ``<spool>/tls-failures.json``) the memory is shared
    by the relay's worker processes: the worker that delivered is rarely the one that takes the
    next SMTP session.
    """

    def __init__(
        self,
        ttl: float,
        max_entries: int = 10000,
        clock: Any = time.time,
        state: StateFile | None = None,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self.state = state
        # domain -> {level failed at -> (when, reason)}
        self._failures: OrderedDict[str, dict[str, tuple[float, str]]] = OrderedDict()

    def record_failure(
        self, domain: str, reason: str = "TLS could not be established", level: str = VERIFY
    ) -> None:
        key, when = normalize_domain(domain), self._clock()

        def change(table: dict[str, Any]) -> None:
            entry = table.pop(key, {})
            entry[level] = (when, reason)
            table[key] = entry
            self._prune(table)

        self._change(change)

    def record_success(self, domain: str, level: str = VERIFY) -> None:
        """TLS at ``level`` worked: failures at that level or a weaker one are void."""
        key = normalize_domain(domain)

        def change(table: dict[str, Any]) -> None:
            entry = table.get(key, {})
            for failed_level in [lv for lv in entry if _STRICTNESS[lv] <= _STRICTNESS[level]]:
                del entry[failed_level]
            if not entry:
                table.pop(key, None)

        if key in self._failures or (self.state is not None and self.state.changed()):
            self._change(change)

    def recent_failure(self, domain: str, level: str = VERIFY) -> str | None:
        """Why TLS at ``level`` to ``domain`` failed less than ``ttl`` seconds ago, else None."""
        if self.state is not None and self.state.changed():
            self._failures = self._from_table(self.state.load())
        entry = self._failures.get(normalize_domain(domain))
        if not entry:
            return None
        now = self._clock()
        relevant = [
            (when, reason)
            for failed_level, (when, reason) in entry.items()
            if _STRICTNESS[failed_level] <= _STRICTNESS[level] and now - when <= self.ttl
        ]
        return max(relevant)[1] if relevant else None

    def _change(self, change: Any) -> None:
        """Apply ``change`` to the shared table (or to the memory alone, without one)."""
        if self.state is not None:
            table = self.state.update(change)
            if table is not None:
                self._failures = self._from_table(table)
                return
        change(self._failures)

    def _prune(self, table: dict[str, Any]) -> None:
        now = self._clock()
        for key in list(table):
            table[key] = {lv: w for lv, w in table[key].items() if now - w[0] <= self.ttl}
            if not table[key]:
                del table[key]
        for key in list(table)[: max(0, len(table) - self.max_entries)]:
            del table[key]

    @staticmethod
    def _from_table(table: dict[str, Any] | None) -> OrderedDict[str, dict[str, tuple[float, str]]]:
        failures: OrderedDict[str, dict[str, tuple[float, str]]] = OrderedDict()
        for domain, entry in (table or {}).items():
            try:
                failures[domain] = {
                    level: (float(when), str(reason))
                    for level, (when, reason) in entry.items()
                    if level in _STRICTNESS
                }
            except (TypeError, ValueError, AttributeError):
                continue  # a damaged entry is skipped, not fatal
        return failures


# --- the policy -----------------------------------------------------------------------------


class TlsPolicy:
    """``await policy.requirement(sender_domain, recipient_domain) -> TlsRequirement``."""

    def __init__(
        self,
        config: Config,
        resolver: Any,
        mta_sts: MtaSts | None = None,
        failures: TlsFailureCache | None = None,
        state_dir: Path | None = None,
        shared_state: bool = False,
    ) -> None:
        """``shared_state`` (the relay sets it): keep the failure memory and the MTA-STS cache
        in the spool directory (or ``state_dir``), shared between worker processes and kept
        across restarts.  Tools (``smg tls probe``, ``smg explain``) keep theirs in memory."""
        if shared_state and state_dir is None:
            from gateway.queue.spool import resolve_path

            state_dir = resolve_path(config.gateway.spool).parent
        self.config = config
        self.rules = compile_rules(config.tls_policy.rules)
        self.ca_bundle = config.tls_policy.ca_bundle
        if mta_sts is None and config.mta_sts.enabled and resolver is not None:
            state = StateFile(state_dir / MTA_STS_STATE) if state_dir else None
            mta_sts = MtaSts(config.mta_sts, resolver, state=state)
        self.mta_sts = mta_sts if config.mta_sts.enabled else None
        ttl = config.tls_policy.failure_memory
        state = StateFile(state_dir / FAILURES_STATE) if state_dir else None
        self.failures = failures or TlsFailureCache(ttl, state=state)

    def carry_over(self, previous: TlsPolicy) -> None:
        """After a config reload: keep what the relay learnt (recent TLS failures, cached
        MTA-STS policies), so a reload neither forgets a failure nor opens the window in which
        a blocked policy refresh would downgrade a domain."""
        previous.failures.ttl = self.failures.ttl
        self.failures = previous.failures
        if self.mta_sts is not None and previous.mta_sts is not None:
            self.mta_sts.adopt(previous.mta_sts)

    def rule_for(self, sender_domain: str, recipient_domain: str) -> CompiledRule | None:
        """The most specific forced-TLS rule for this pair, or None."""
        sender, recipient = normalize_domain(sender_domain), normalize_domain(recipient_domain)
        for rule in self.rules:  # sorted most specific first
            if rule.matches(sender, recipient):
                return rule
        return None

    async def requirement(self, sender_domain: str, recipient_domain: str) -> TlsRequirement:
        rule = self.rule_for(sender_domain, recipient_domain)
        if rule is not None:
            return TlsRequirement(rule.level, rule.on_failure, rule.name, (), self.ca_bundle)
        if self.mta_sts is not None:
            policy = await self.mta_sts.policy(normalize_domain(recipient_domain))
            if policy is not None and policy.mode != "none":
                return requirement_for_mta_sts(policy, self.ca_bundle)
        return TlsRequirement(OPPORTUNISTIC, None, "default", (), self.ca_bundle)


# --- describing a TLS session (for logs and the probe) --------------------------------------


@dataclass(frozen=True)
class TlsOutcome:
    """What a delivery's TLS was: version, cipher and verification result for the log.

    ``verification``: ``verified`` (checked in the handshake: level verify), ``trusted`` (not
    required, but chain and name would have verified), ``untrusted`` (with ``detail``), or
    ``none`` (no TLS).
    """

    version: str | None
    cipher: str | None
    verification: str
    detail: str = ""

    @property
    def encrypted(self) -> bool:
        return self.version is not None

    def log_fields(self) -> str:
        if not self.encrypted:
            return "tls=none"
        text = f"tls={self.version} cipher={self.cipher} verify={self.verification}"
        return f"{text} ({self.detail})" if self.detail else text


NO_TLS = TlsOutcome(None, None, "none")


def describe_tls(ssl_object: Any, host: str, requirement: TlsRequirement) -> TlsOutcome:
    """Describe an established TLS session (``ssl.SSLObject`` or ``ssl.SSLSocket``).

    Under ``verify`` the handshake already verified chain and name.  Otherwise the certificate
    is checked here against ``requirement.ca_bundle`` so the log says whether it would pass.
    """
    if ssl_object is None:
        return NO_TLS
    version = ssl_object.version()
    cipher = (ssl_object.cipher() or ("?",))[0]
    if requirement.level == VERIFY:
        return TlsOutcome(version, cipher, "verified")
    problem = verify_chain(peer_chain_der(ssl_object), host, requirement.ca_bundle)
    if problem is None:
        return TlsOutcome(version, cipher, "trusted")
    return TlsOutcome(version, cipher, "untrusted", problem)


def peer_chain_der(ssl_object: Any) -> list[bytes]:
    """The peer's certificates as DER, leaf first (the whole chain where Python exposes it)."""
    inner = getattr(ssl_object, "_sslobj", ssl_object)
    get_chain = getattr(inner, "get_unverified_chain", None)
    if get_chain is not None:
        try:
            chain = get_chain() or []
            ders = [cert.public_bytes(ssl.ENCODING_DER) for cert in chain]
            if ders:
                return ders
        except (AttributeError, ValueError, ssl.SSLError):
            pass  # fall back to the leaf
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


_STORES: dict[str, Any] = {}


def _store(ca_bundle: Path | None) -> Any:
    from cryptography import x509
    from cryptography.x509 import verification

    key = str(ca_bundle or ssl.get_default_verify_paths().cafile or "")
    if key not in _STORES:
        certs = x509.load_pem_x509_certificates(Path(key).read_bytes()) if key else []
        _STORES[key] = verification.Store(certs) if certs else None
    return _STORES[key]


def verify_chain(chain_der: list[bytes], host: str, ca_bundle: Path | None) -> str | None:
    """None if the chain is valid for ``host`` against ``ca_bundle``, else why not."""
    from cryptography import x509
    from cryptography.x509 import verification

    if not chain_der:
        return "no certificate"
    try:
        store = _store(ca_bundle)
    except (OSError, ValueError) as exc:
        return f"cannot read CA bundle {ca_bundle}: {exc}"
    if store is None:
        return f"no CA certificates in {ca_bundle}"
    try:
        leaf, *rest = (x509.load_der_x509_certificate(der) for der in chain_der)
        name = x509.DNSName(host.rstrip(".").lower())
        verifier = (
            verification.PolicyBuilder()
            .store(store)
            .time(dt.datetime.now(dt.UTC))
            .build_server_verifier(name)
        )
        verifier.verify(leaf, rest)
    except verification.VerificationError as exc:
        return _short_reason(str(exc))
    except ValueError as exc:
        return f"bad certificate: {exc}"
    return None


def _short_reason(message: str) -> str:
    """A short reason from cryptography's verification message, like OpenSSL's wording."""
    lowered = message.lower()
    if "not valid at validation time" in lowered or "expired" in lowered:
        return "certificate has expired or is not yet valid"
    if "subjectaltname" in lowered:
        return "certificate name does not match the MX host name"
    if "candidates exhausted" in lowered or "issuer" in lowered:
        return "chain not trusted by the CA bundle"
    return message.split(" (encountered", 1)[0]
