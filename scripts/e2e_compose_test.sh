#!/usr/bin/env bash
# e2e_compose_test.sh - the two-NAT topology in containers (compose/compose.yaml), end to end.
#
#   ./scripts/e2e_compose_test.sh [--image TAG]
#
# Builds the images (scripts/build_images.sh; --image TAG uses an existing punchgate image
# instead), then brings the topology up with podman-compose in order - bootstrap, gateways,
# echo and probe; then the provider once the bootstrap answers; then the client once the
# provider holds a relay reservation - and checks:
#   1. the bootstrap container is the README's VPS recipe (image, user, entrypoint, identity
#      on its volume, PUNCHGATE_LISTEN as in the README, TCP and QUIC on port 4001);
#   2. with two port-preserving gateways the probe's 1 MiB comes back through both NATs
#      (sha256) over a direct (hole-punched) tunnel;
#   3. the probe cannot reach the echo service without the tunnel;
#   4. with nat-b symmetric (--random-fully) the echo comes back over a relayed tunnel;
#   5. the bootstrap keeps its peer ID across a restart (identity on the volume).
# It always tears everything down (containers, networks, volumes of its own project) and
# keeps each container's log in logs/compose-<service>.log. Needs root and podman.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

IMAGE=
while [ $# -gt 0 ]; do
    case "$1" in
        --image) [ $# -ge 2 ] || { echo "e2e_compose: --image needs a value" >&2; exit 2; }; IMAGE=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "e2e_compose: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

log() { echo "e2e_compose: $*" >&2; }
FAILURES=()  # checks that failed without stopping the run (the tunnel's path)
fail_later() { log "FAILED: $*"; FAILURES+=("$*"); }
die() { echo "e2e_compose: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (podman networks with NET_ADMIN gateways)"
if [ -x .venv/bin/podman-compose ]; then COMPOSE_BIN=$ROOT/.venv/bin/podman-compose
elif command -v podman-compose >/dev/null; then COMPOSE_BIN=$(command -v podman-compose)
else die "podman-compose is missing (pip install podman-compose; scripts/test.sh installs it)"; fi
PYTHON=python3

set -a
# shellcheck source=nat_topology.env
source scripts/nat_topology.env
set +a
if [ -z "$IMAGE" ]; then
    ./scripts/build_images.sh
    IMAGE=localhost/punchgate:local
fi
export PUNCHGATE_IMAGE=$IMAGE
export BASE_IMAGE=localhost/punchgate-base:bookworm
podman image exists "$IMAGE" || die "image $IMAGE does not exist"

# Our subnets must be free: another run of this test (or anything else) may hold them.
for net in "$PUBLIC_NET" "$LANA_NET" "$LANB_NET"; do
    holder=$(podman network ls --format '{{.Name}} {{range .Subnets}}{{.Subnet}} {{end}}' | awk -v n="$net" '$0 ~ " "n" " || $0 ~ " "n"$" {print $1}')
    [ -z "$holder" ] || die "subnet $net is in use by podman network '$holder' (another compose test running?)"
done

PROJECT=pgcompose-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
compose() { timeout 300 "$COMPOSE_BIN" --project-name "$PROJECT" --file compose/compose.yaml "$@" >/dev/null 2>&1; }
name() { echo "${PROJECT}_$1_1"; }
started=$(date +%s)

cleanup() {
    local status=$? c
    mkdir -p logs
    for c in bootstrap nat-a nat-b echo provider client probe; do
        podman logs "$(name "$c")" >"logs/compose-$c.log" 2>&1 || true
    done
    compose down --volumes --timeout 3 || true
    # Whatever compose left of our project (by its label), removed by exact name.
    for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
        podman rm --force --volumes "$c" >/dev/null 2>&1 || true
    done
    for n in $(podman network ls --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Name}}'); do
        podman network rm --force "$n" >/dev/null 2>&1 || true
    done
    for v in $(podman volume ls --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Name}}'); do
        podman volume rm --force "$v" >/dev/null 2>&1 || true
    done
    if [ $status -eq 0 ]; then log "PASSED in $(( $(date +%s) - started )) s; logs in logs/compose-*.log"
    else log "logs in logs/compose-*.log"; fi
}
trap cleanup EXIT

# status SERVICE: the node's status JSON (from its control socket, inside its container)
status() { podman exec "$(name "$1")" punchgate status --json 2>/dev/null; }
# field SERVICE EXPR: a Python expression over the status dict `s`, printed
field() { status "$1" | $PYTHON -c "import json, sys; s = json.load(sys.stdin); print($2)"; }
# wait_until SECONDS WHAT CMD...: poll CMD (bounded) until it succeeds
wait_until() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${limit} s waiting for $what"
        sleep 0.5
    done
}
is_true() { [ "$("$@" 2>/dev/null)" = True ]; }

# The probe sends SIZE random bytes to HOST:PORT, half-closes, reads to EOF, compares sha256.
ECHO_CHECK='
import hashlib, os, socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = os.urandom(size)
s = socket.create_connection((host, port), timeout=float(sys.argv[4]))
s.settimeout(30)
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
got = bytearray()
while data := s.recv(65536):
    got += data
ok = hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
print("ok" if ok else "differs: %d of %d bytes" % (len(got), size))
sys.exit(0 if ok else 1)
'
echo_via_tunnel() { podman exec "$(name probe)" python3 -c "$ECHO_CHECK" "$HOSTB_IP" 2222 $((1 << 20)) 10; }

log "project $PROJECT: bootstrap, gateways, echo, probe"
compose up --detach bootstrap nat-a nat-b echo probe || die "podman-compose up failed"
wait_until 60 "the bootstrap node" is_true field bootstrap '"ready" == s["phase"]'
BOOTSTRAP_PEER_ID=$(field bootstrap 's["peer_id"]')
export BOOTSTRAP_PEER_ID
log "bootstrap $BOOTSTRAP_PEER_ID at $PUB_IP"

# 1. The bootstrap container is the VPS recipe of the README.
# (no `grep -q`/`head` in pipelines here: with pipefail, the writer they cut off fails the check)
readme_listen=$(sed -n 's/.*--env PUNCHGATE_LISTEN=\([^ ]*\).*/\1/p' README.md | sed -n 1p)
[ -n "$readme_listen" ] || die "README has no VPS recipe with --env PUNCHGATE_LISTEN=..."
boot=$(name bootstrap)
[ "$(podman inspect --format '{{.Image}}' "$boot")" = "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ] ||
    die "bootstrap does not run $IMAGE"
[ "$(podman inspect --format '{{.Config.User}}' "$boot")" = punchgate ] || die "bootstrap does not run as punchgate"
command_of() { podman inspect --format '{{json .Config.Entrypoint}} {{json .Config.Cmd}}' "$1"; }
[ "$(command_of "$boot")" = '"punchgate" null' ] || die "bootstrap's command is not the image's own: $(command_of "$boot")"
boot_listen=$(podman inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$boot" | sed -n 's/^PUNCHGATE_LISTEN=//p')
[ "$boot_listen" = "$readme_listen" ] ||
    die "bootstrap's PUNCHGATE_LISTEN '$boot_listen' is not the README's '$readme_listen'"
mounts=$(podman inspect --format '{{range .Mounts}}{{.Type}}:{{.Destination}} {{end}}' "$boot")
[[ " $mounts" == *" volume:/var/lib/punchgate "* ]] || die "bootstrap's identity is not on a volume (mounts: $mounts)"
is_true field bootstrap '"/ip4/0.0.0.0/tcp/4001" in s["listen_addrs"] and "/ip4/0.0.0.0/udp/4001/quic-v1" in s["listen_addrs"]' ||
    die "bootstrap does not listen on TCP and QUIC port 4001"
log "bootstrap matches the README's VPS recipe"

log "provider (lan-a, behind nat-a)"
compose up --detach --no-deps provider || die "podman-compose up provider failed"
wait_until 60 "the provider's relay reservation" is_true field provider \
    's["nat"]["status"] == "private" and any(r["status"] == "reserved" for r in s["relays"])'
log "client (lan-b, behind nat-b, port preserving)"
compose up --detach --no-deps client || die "podman-compose up client failed"
wait_until 60 "the client behind nat-b" is_true field client 's["phase"] == "ready" and s["nat"]["status"] == "private"'

# 2. Cone gateways: the echo through both NATs, over a direct connection.
wait_until 60 "an echo through the tunnel (cone NATs)" echo_via_tunnel
path=$(field client 's["tunnels"][0]["path"]')
log "cone NATs: 1 MiB echoed through both NATs, tunnel path: $path"
podman exec "$(name client)" punchgate status >&2 || true
grep -E '"event": "hole punch"' <(podman logs "$(name client)" 2>&1) | tail -n1 >&2 || true
[ "$path" = direct ] || fail_later "the tunnel is '$path' with port-preserving gateways; expected direct (hole punch)"

# 3. Without the tunnel, lan-b cannot reach the echo service on lan-a.
if podman exec "$(name probe)" python3 -c "$ECHO_CHECK" "$ECHO_IP" 7777 16 3 >/dev/null 2>&1; then
    die "the probe reached $ECHO_IP:7777 directly: the NATs do not isolate the LANs"
fi
log "the probe cannot reach $ECHO_IP:7777 directly"

# 4. Symmetric nat-b: the client's NAT maps every flow to a random port; relayed tunnel.
log "nat-b switched to --random-fully; client restarted"
NAT_B_MODE=--symmetric compose up --detach --no-deps --force-recreate nat-b client || die "recreating nat-b failed"
wait_until 60 "the client behind the symmetric nat-b" is_true field client \
    's["phase"] == "ready" and s["nat"].get("port_preserving") is False'
wait_until 60 "an echo through the tunnel (symmetric NAT)" echo_via_tunnel
path=$(field client 's["tunnels"][0]["path"]')
log "symmetric nat-b: 1 MiB echoed through both NATs, tunnel path: $path"
[ "$path" = relayed ] || fail_later "the tunnel is '$path' behind a symmetric NAT; expected relayed"

# 5. The identity lives on the bootstrap's volume.
podman restart --time 5 "$boot" >/dev/null
wait_until 60 "the bootstrap after a restart" is_true field bootstrap '"ready" == s["phase"]'
[ "$(field bootstrap 's["peer_id"]')" = "$BOOTSTRAP_PEER_ID" ] || die "the bootstrap's peer ID changed across a restart"
log "bootstrap kept its peer ID across a restart"

if [ ${#FAILURES[@]} -gt 0 ]; then
    die "${#FAILURES[@]} check(s) failed: $(printf '%s; ' "${FAILURES[@]}")"
fi
