#!/usr/bin/env bash
# Install everything the tests need, then run them: ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use (root only; each group installed when a command is missing):
# the NAT lab (namespaces, iptables, conntrack); UDP, proxy and `punchgate connect` tests (a
# real DNS server, curl, a throwaway sshd); port mapping (miniupnpd's nftables build, nft);
# containers (Podman run with runc, debootstrap for the offline base images, built once per
# run by scripts/build_images.sh). One `apt-get update` for all of them.
if [ "$(id -u)" = 0 ]; then
    packages=()
    { command -v iptables && command -v conntrack && command -v ip; } >/dev/null 2>&1 ||
        packages+=(iptables conntrack iproute2)
    { command -v dnsmasq && command -v curl && command -v ssh && { command -v sshd || [ -x /usr/sbin/sshd ]; }; } >/dev/null 2>&1 ||
        packages+=(dnsmasq-base curl openssh-server openssh-client)
    { command -v miniupnpd && command -v nft; } >/dev/null 2>&1 || packages+=(miniupnpd-nftables miniupnpd nftables)
    { command -v podman && command -v runc && command -v debootstrap; } >/dev/null 2>&1 || packages+=(podman runc debootstrap)
    if [ "${#packages[@]}" -gt 0 ]; then
        # Tests start their own sshd and miniupnpd; Debian would start its own unless
        # policy-rc.d says no (a temporary one, removed after the install).
        norc=/usr/sbin/policy-rc.d
        made_norc=""
        if [ ! -e "$norc" ]; then printf '#!/bin/sh\nexit 101\n' >"$norc" && chmod 755 "$norc" && made_norc=1; fi
        status=0
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null; } || status=$?
        if [ -n "$made_norc" ]; then rm -f "$norc"; fi
        [ "$status" = 0 ] || exit "$status"
    fi
fi

# The js-libp2p peer of tests/test_js_interop.py (tests/js/): its npm packages, when npm is
# here and they are missing or older than the lock file.
if command -v npm >/dev/null 2>&1 && ! [ tests/js/node_modules/.package-lock.json -nt tests/js/package-lock.json ]; then
    npm ci --prefix tests/js --no-audit --no-fund --loglevel=error >/dev/null
fi

python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
./scripts/lint.sh  # ruff and mypy on punchgate/
exec .venv/bin/python -m pytest "$@"
