"""Relay bench: ``smg serve`` (durable queue) against Postfix as a plain relay, same sink.

Run ``python -m bench.relay --help`` (or ``python bench/relay/run.py``); see bench/README.md.
"""
