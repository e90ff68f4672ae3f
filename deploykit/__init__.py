"""The deploy's own Python: the inventory schema, its loader and checks, each host's relay
config, the DKIM key maker and ``python -m deploykit``.  Beside ``deploy.py`` and ``roles/``,
not part of the relay wheel (``gateway/``).

    paths       HostPaths, the ports the roles and the relay config agree on
    problems    Source, Problem, InventoryError
    schema      KEYS: every inventory key, its parser and default; DKIM entries
    loader      the inventory file and pyinfra's group_data layers
    checks      the checks of a loaded inventory (fleet, TLS rules, DNSBL, DKIM, certificates)
    host, fleet Gateway (one host's values), Fleet
    render      the relay config (smg.toml) of each host, written with tomli-w
    inventory   validate_inventory (called by the inventory file), load_inventory
    dkim_keys   making the DKIM keys and dns-records.txt
    cli         python -m deploykit check|render|dkim-keys|dns-records INVENTORY
"""
