#!/usr/bin/env bash
# Prepare a machine (Debian 12, run as root) for the test suite. Idempotent: a re-run only
# checks (dpkg status, a venv stamp) and prints what it skipped.
#
#   1. Debian packages the tests use (daemons are run by hand by tests/harness, never as
#      system services), installed non-interactively; Postfix preseeded as "Local only".
#   2. The system copies of the daemons are not left running by the install: service starts
#      are blocked with a temporary policy-rc.d (when none exists), and anything the install
#      started anyway is stopped. Services that were already running are left alone.
#   3. A venv at $REPO/.venv from the python3 on PATH (>= 3.11) with `pip install -e .[dev]`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
STAMP="$VENV/.smg-setup-stamp"

# Add a package here when a test or lab script needs it (CI starts from a fresh machine).
PACKAGES=(
    swaks libio-socket-ssl-perl libnet-ssleay-perl
    postfix
    clamav clamav-daemon clamav-freshclam clamav-milter
    rspamd
    knot knot-dnsutils
    unbound dns-root-data
    opendkim opendkim-tools libmail-dkim-perl
    debootstrap systemd-container apt-cacher-ng zstd nftables iproute2
    python3-venv openssl ca-certificates
    prometheus prometheus-alertmanager prometheus-node-exporter chromium
)
# System services these packages ship; none of them may be left running by the install.
SERVICES=(
    postfix clamav-daemon clamav-freshclam clamav-milter rspamd redis-server knot
    opendkim apt-cacher-ng prometheus prometheus-alertmanager prometheus-node-exporter
)

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

missing_packages() {
    # One dpkg-query for all (fast re-runs); unknown packages are reported on stderr: drop it.
    local installed
    installed="$(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" 2>/dev/null \
        | awk '$NF == "installed" && $(NF-1) == "ok" {print $1}' || true)"
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        grep -qx "$pkg" <<<"$installed" || printf '%s\n' "$pkg"
    done
}

have_systemd() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; }

active_services() {
    have_systemd || return 0
    local svc
    for svc in "${SERVICES[@]}"; do
        systemctl is-active --quiet "$svc" 2>/dev/null && printf '%s\n' "$svc"
    done
    return 0
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages)
    if ((${#missing[@]} == 0)); then
        log "Debian packages: all ${#PACKAGES[@]} installed, skipping apt-get"
        return
    fi
    [[ $EUID -eq 0 ]] || die "must run as root to install: ${missing[*]}"
    log "Debian packages missing: ${missing[*]}"

    log "preseeding postfix: main_mailer_type 'Local only'"
    debconf-set-selections <<EOF
postfix postfix/main_mailer_type select Local only
postfix postfix/mailname string $(hostname -f 2>/dev/null || hostname)
EOF

    local policy=/usr/sbin/policy-rc.d created_policy=0 before
    if [[ ! -e $policy ]]; then
        log "blocking service starts during the install (temporary $policy)"
        printf '#!/bin/sh\n# temporary, written by scripts/setup.sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        created_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    else
        log "$policy exists: service starts are already blocked"
    fi
    before="$(active_services)"

    log "apt-get update"
    apt-get update
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold "${missing[@]}"

    if ((created_policy)); then
        rm -f "$policy"
        trap - EXIT
        log "removed temporary $policy"
    fi
    stop_services_started_by_install "$before"
}

stop_services_started_by_install() {
    local before="$1" svc
    if ! have_systemd; then
        log "no systemd: nothing was started as a service"
        return
    fi
    for svc in $(active_services); do
        if ! grep -qx "$svc" <<<"$before"; then
            log "stopping $svc (started by the install)"
            systemctl stop "$svc" || log "warning: could not stop $svc"
        fi
    done
}

python_ok() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

setup_venv() {
    local python want
    python="$(command -v python3 || true)"
    [[ -n $python ]] || die "python3 not found on PATH"
    python_ok "$python" || die "$python is $("$python" -V 2>&1); need >= 3.11"
    want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1) $("$python" -V 2>&1)"
    if [[ -x $VENV/bin/python ]] && [[ -f $STAMP ]] && [[ "$(cat "$STAMP")" == "$want" ]]; then
        log "venv $VENV: up to date with pyproject.toml, skipping pip"
        return
    fi
    if [[ ! -x $VENV/bin/python ]]; then
        log "creating venv $VENV with $python ($("$python" -V 2>&1))"
        "$python" -m venv "$VENV"
    fi
    log "pip install -e '.[dev]' into $VENV"
    (cd "$REPO" && "$VENV/bin/pip" install --quiet -e '.[dev]')
    printf '%s\n' "$want" >"$STAMP"
}

log "repository: $REPO"
install_packages
setup_venv
log "done"
