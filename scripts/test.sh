#!/usr/bin/env bash
# Install everything the tests need, then run them: ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# System tools for the NAT tests (network namespaces, iptables, conntrack); root only.
if [ "$(id -u)" = 0 ] && ! { command -v iptables && command -v conntrack && command -v ip; } >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables conntrack iproute2 >/dev/null
fi

# UDP, proxy and `punchgate connect` tests: a real DNS server, curl, a throwaway sshd; root only.
if [ "$(id -u)" = 0 ] && ! { command -v dnsmasq && command -v curl && command -v ssh && { command -v sshd || [ -x /usr/sbin/sshd ]; }; } >/dev/null 2>&1; then
    # Tests start their own sshd; Debian's would start on port 22 unless policy-rc.d says no.
    norc=/usr/sbin/policy-rc.d
    made_norc=""
    if [ ! -e "$norc" ]; then printf '#!/bin/sh\nexit 101\n' >"$norc" && chmod 755 "$norc" && made_norc=1; fi
    apt-get update -qq
    status=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsmasq-base curl openssh-server openssh-client >/dev/null || status=$?
    if [ -n "$made_norc" ]; then rm -f "$norc"; fi
    [ "$status" = 0 ] || exit "$status"
fi

# Port mapping tests (tests/test_port_mapping.py): miniupnpd (its nftables build) and nft; root only.
if [ "$(id -u)" = 0 ] && ! { command -v miniupnpd && command -v nft; } >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq miniupnpd-nftables miniupnpd nftables >/dev/null
fi

# The js-libp2p peer of tests/test_js_interop.py (tests/js/): its npm packages, when npm is
# here and they are missing or older than the lock file.
if command -v npm >/dev/null 2>&1 && ! [ tests/js/node_modules/.package-lock.json -nt tests/js/package-lock.json ]; then
    npm ci --prefix tests/js --no-audit --no-fund --loglevel=error >/dev/null
fi

# Container tests: Podman (run with runc), debootstrap for the offline base images; root only.
# scripts/build_images.sh configures Podman and builds the images once per run.
if [ "$(id -u)" = 0 ] && ! { command -v podman && command -v runc && command -v debootstrap; } >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi

python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
./scripts/lint.sh  # ruff and mypy on punchgate/
exec .venv/bin/python -m pytest "$@"
