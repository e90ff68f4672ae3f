#!/usr/bin/env bash
# The main job (README): set up this machine, bring up the lab fleet, deploy the gateways onto
# it with pyinfra, and say how to send a test mail.  Run as root from anywhere.
#
#   bash scripts/lab.sh          # set-up, lab up, DKIM keys, deploy
#   python -m lab down           # afterwards: take the lab down again (.venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/lab.sh: run as root (the lab uses network namespaces and systemd-nspawn)" >&2
    exit 1
fi

step() { printf '\n==> %s\n' "$*"; }

step "set-up: packages and the virtual environment (scripts/setup.sh)"
bash scripts/setup.sh

step "the lab fleet: python -m lab up"
.venv/bin/python -m lab up

step "DKIM keys of the lab inventory (made once, kept in keys/lab/)"
.venv/bin/python -m deploykit dkim-keys inventories/lab.py

step "deploy: pyinfra inventories/lab.py deploy.py -y"
TIMEFORMAT=$'\ndeploy took %1R s'
time .venv/bin/pyinfra inventories/lab.py deploy.py -y

state=lab/run/state.json
customer_ns=$(.venv/bin/python -c "import json; print(json.load(open('$state'))['customer']['netns'])")
cat <<INFO

==> The gateways are up.  Send a test mail from the customer host through otc-de-mta01:

    ip netns exec $customer_ns swaks --server 198.51.100.10 \\
        --from alice@customer-a.example --to bob@partner-tls.example \\
        --header 'Subject: hello from the lab'

  It arrives at the far end mx.partner-tls.example (lab/run/farend/mx-tls/mail/), signed with
  customer-a.example's DKIM key and sent over verified TLS (the lab's forced-TLS rule).
  Spam (GTUBE) leaves through otc-de-mta03 instead:

    ip netns exec $customer_ns swaks --server 198.51.100.10 \\
        --from alice@customer-a.example --to bob@partner-plain.example \\
        --body 'XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X'

  Check the hosts:  .venv/bin/pytest tests/infra/test_gateways.py
  Re-deploy:        .venv/bin/pyinfra inventories/lab.py deploy.py -y   (changes nothing)
  Take it down:     .venv/bin/python -m lab down
INFO
