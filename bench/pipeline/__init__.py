"""Pipeline bench: ``smg serve`` with clamd, rspamd and DKIM against Postfix with milters.

Run ``python -m bench.pipeline --help`` (or ``python bench/pipeline/run.py``), and
``python bench/pipeline/dkim_sign.py`` for the DKIM signing medians; see bench/README.md.
"""
