"""The SMTP intake: aiosmtpd speaking to customers' MTAs.

Split the aiosmtpd way: ``protocol`` (the ``SMTP`` subclass: limits, strict CRLF, STARTTLS,
timeouts, reading DATA) parses and checks the commands and asks ``handler`` (the hooks: relay
control, the policy chain's stages, the cleanup step that queues) for the replies to MAIL,
RCPT and DATA; ``listener`` has the listeners, the connection cap, the graceful stop and the
runtime a reload swaps.
"""

from gateway.intake.listener import Intake, Runtime, make_tls_context

__all__ = ["Intake", "Runtime", "make_tls_context"]
