"""Test harness: real daemons (knot DNS, clamd, rspamd, Postfix, SMTP sinks) started by hand.

See tests/harness/README.md for how to use each one.
"""

from .ca import WRONG_NAME, LeafCert, TestCA
from .clamd import EICAR, EICAR_SIGNATURE_PREFIX, Clamd
from .knot import DeadNameserver, KnotDNS
from .postfix import TLS_MODES, PostfixFarEnd, ReceivedMessage
from .proxy import StartTLSStripProxy
from .rspamd import GTUBE, Rspamd
from .sink import SinkMessage, SmtpSink
from .swaks import SwaksResult, swaks
from .util import DaemonStartError, HarnessError, common_port, free_port, wait_for

__all__ = [
    "EICAR",
    "EICAR_SIGNATURE_PREFIX",
    "GTUBE",
    "TLS_MODES",
    "WRONG_NAME",
    "Clamd",
    "DaemonStartError",
    "DeadNameserver",
    "HarnessError",
    "KnotDNS",
    "LeafCert",
    "PostfixFarEnd",
    "ReceivedMessage",
    "Rspamd",
    "SinkMessage",
    "SmtpSink",
    "StartTLSStripProxy",
    "SwaksResult",
    "TestCA",
    "common_port",
    "free_port",
    "swaks",
    "wait_for",
]
