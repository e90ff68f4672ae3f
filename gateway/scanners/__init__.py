"""Clients for the content scanners the policy asks: clamd (viruses) and rspamd (spam).

Both are small asyncio clients of our own: they speak only the part of each protocol the relay
needs, bound every wait by a timeout, and raise one exception type per scanner so that a rule
can turn "the scanner could not answer" into a temporary failure.
"""
