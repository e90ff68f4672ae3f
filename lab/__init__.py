"""The local lab fleet: gateway hosts booted with systemd-nspawn plus the lab's internet.

Run as root: `python -m lab up|down|status|ssh HOST|exec HOST CMD`. See docs/lab.md.
"""
