#!/usr/bin/env bash
# The whole check, as CI runs it (.ci/run): set-up, lint, then the test suites.
# Exits non-zero on any failure; a pytest run that collects no tests is a failure too.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="$REPO/.venv/bin/python"

log() { printf '[test] %s\n' "$*"; }

# run_pytest PATH...: pytest over the given suites, printing its normal summary line.
run_pytest() {
    local rc=0
    log "pytest $*"
    "$PY" -m pytest -ra "$@" || rc=$?
    case $rc in
        0) ;;
        5) log "FAIL: pytest collected no tests in: $*"; return 1 ;;
        *) log "FAIL: pytest exited $rc for: $*"; return "$rc" ;;
    esac
}

log "scripts/setup.sh"
bash "$REPO/scripts/setup.sh"

log "ruff check ."
"$REPO/.venv/bin/ruff" check .

run_pytest -m "not lab and not memory" tests/unit tests/integration
run_pytest -m memory tests/integration  # peak RSS under large messages: docs/performance.md

# ---------------------------------------------------------------------------------------
# LAB SUITES (owner: acceptance; docs/acceptance.md): root only, mandatory with CI=true.
#   python -m lab up (a trap takes it down again, whatever happens), the DKIM keys, the
#   deploy, a second deploy that must change nothing, then tests/infra and tests/acceptance.
# ---------------------------------------------------------------------------------------

lab_down() {
    log "python -m lab down"
    "$PY" -m lab down || log "WARNING: python -m lab down left something behind (listed above)"
}

# deploy_lab: the lab deploy, its output shown; DEPLOY_CHANGES = operations that changed
# something (pyinfra's "Grand total" row: Operation Hosts Success Error No-Change).
deploy_lab() {
    local out rc started
    out="$(mktemp)"
    started=$SECONDS
    set +e
    "$REPO/.venv/bin/pyinfra" inventories/lab.py deploy.py -y 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    set -e
    DEPLOY_SECONDS=$((SECONDS - started))
    DEPLOY_CHANGES="$(sed 's/\x1b\[[0-9;]*m//g' "$out" \
        | awk '$1 == "Grand" && $2 == "total" { print ($4 == "-" ? 0 : $4) }' | tail -n 1)"
    rm -f "$out"
    if [ "$rc" -ne 0 ]; then
        log "FAIL: the deploy exited $rc"
        return "$rc"
    fi
    if [ -z "$DEPLOY_CHANGES" ]; then
        log "FAIL: no 'Grand total' row in pyinfra's output"
        return 1
    fi
}

if [ "$(id -u)" -ne 0 ]; then
    if [ "${CI:-}" = "true" ]; then
        log "FAIL: CI=true but not root: the lab suites (tests/infra, tests/acceptance) need root"
        exit 1
    fi
    log "SKIP: the lab suites (tests/infra, tests/acceptance) need root"
else
    # A lab that was up before this script (someone's working lab) is left up, outside CI.
    if [ "${CI:-}" = "true" ] || ! "$PY" -m lab status >/dev/null 2>&1; then
        trap lab_down EXIT
        trap 'exit 130' INT TERM
    else
        log "the lab was already up: it stays up afterwards"
    fi
    log "python -m lab up"
    "$PY" -m lab up
    log "DKIM keys of the lab inventory"
    "$PY" -m deploykit dkim-keys inventories/lab.py
    log "deploy (1/2): pyinfra inventories/lab.py deploy.py -y"
    deploy_lab
    log "deploy (1/2): $DEPLOY_CHANGES changes in $DEPLOY_SECONDS s"
    log "deploy (2/2): the same again must change nothing"
    deploy_lab
    log "deploy (2/2): $DEPLOY_CHANGES changes in $DEPLOY_SECONDS s"
    if [ "$DEPLOY_CHANGES" != "0" ]; then
        log "FAIL: the second deploy changed $DEPLOY_CHANGES operation(s): not idempotent"
        exit 1
    fi
    run_pytest tests/infra
    run_pytest -m lab tests/integration  # tests/integration/test_deploy.py: the change request
    run_pytest tests/acceptance
fi

log "all passed"
