"""One pyinfra deploy per component of a gateway host; ``deploy.py`` composes them by role.

Each module has pure functions that render what a host gets (tested without any host) and an
``apply`` deploy that makes the host so, idempotently: facts first, then operations.
"""
