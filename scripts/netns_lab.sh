#!/usr/bin/env bash
# netns_lab.sh - a two-NAT "home network" lab in Linux network namespaces.
#
# Topology (all addresses exist only inside the lab's namespaces):
#
#                       <PREFIX>-inet  (bridge "br0" = the internet, 100.64.0.0/24)
#                    /         |          \
#   <PREFIX>-pub 100.64.0.10   |           |
#                  <PREFIX>-rtra           <PREFIX>-rtrb
#                  wan 100.64.0.11         wan 100.64.0.12
#                  lan 10.99.1.1/24        lan 10.99.2.1/24
#                      |                       |
#                  <PREFIX>-hosta          <PREFIX>-hostb
#                  10.99.1.10              10.99.2.10
#
# Addresses come from scripts/nat_topology.env and the routers' rules from
# scripts/nat_gateway.sh, which the compose topology (compose/compose.yaml) uses too.
# Routers: MASQUERADE lan->wan (port preserving, "cone-like"; with --symmetric
# the mapping uses --random-fully, so every flow gets a random public port),
# FORWARD policy DROP except lan->wan and ESTABLISHED,RELATED back, INPUT policy
# DROP except loopback, lan, ESTABLISHED,RELATED and ICMP echo. Unsolicited
# inbound traffic is silently dropped (no RST, like a typical home router).
# Private destinations (10/8, 172.16/12, 192.168/16) that are not the router's
# own LAN are blackholed on routers and pub: dialing someone else's LAN address
# times out, as on the real internet.
#
# Usage:
#   netns_lab.sh up   [--symmetric] [--prefix NAME]   build (idempotent)
#   netns_lab.sh down [--prefix NAME]                 remove everything (idempotent,
#                                                     also after a partial up; processes
#                                                     still running inside the lab's
#                                                     namespaces are terminated)
#   netns_lab.sh exec [--prefix NAME] ROLE CMD...     run CMD inside ROLE's namespace
#   netns_lab.sh env  [--prefix NAME]                 print shell variables (addresses, ns names)
#   netns_lab.sh status [--prefix NAME]               show namespaces, addresses, NAT rules
#   netns_lab.sh conntrack [--prefix NAME] ROLE [ARGS...]
#                                                     print ROLE's conntrack table
#                                                     (conntrack -L ARGS, or /proc/net/nf_conntrack)
#   netns_lab.sh direct [--prefix NAME] [--proto tcp|udp] [--all] [--state STATE]
#                                                     print conntrack entries on the routers that
#                                                     are flows between the two routers' public
#                                                     addresses and have seen traffic both ways
#                                                     (not [UNREPLIED]; --all shows those too);
#                                                     exit 0 if such a flow exists on both
#                                                     routers, 1 otherwise. A TCP entry here is
#                                                     proof of a direct (hole-punched) connection:
#                                                     unsolicited inbound is dropped. --state
#                                                     ESTABLISHED ignores e.g. TIME_WAIT leftovers
#                                                     of earlier tests in the same lab.
#   netns_lab.sh portfwd [--prefix NAME] [--remove] rtra|rtrb PORT
#                                                     forward WAN:PORT/tcp of the router to its host's
#                                                     PORT (a manual port forward / UPnP mapping: the
#                                                     host becomes publicly reachable); --remove undoes it
#   netns_lab.sh check                                check that the needed tools exist
#
# ROLE is one of: inet pub rtra rtrb hosta hostb
# The prefix (default "pglab", or $NETNS_LAB_PREFIX) makes all names unique so
# parallel labs do not collide; every lab uses the same addresses, but each lab
# lives in its own namespaces so they never meet.
# Must run as root.

set -Eeuo pipefail

ROLES=(inet pub rtra rtrb hosta hostb)
STATE_DIR=/run/punchgate-netns-lab

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GATEWAY="$SCRIPT_DIR/nat_gateway.sh"
# INET_GW PUB_IP RTRA_WAN RTRB_WAN LANA_NET LANB_NET RTRA_LAN RTRB_LAN HOSTA_IP HOSTB_IP
# shellcheck source=nat_topology.env
source "$SCRIPT_DIR/nat_topology.env"

PREFIX="${NETNS_LAB_PREFIX:-pglab}"
SYMMETRIC=0

die() { echo "netns_lab: error: $*" >&2; exit 1; }
log() { echo "netns_lab: $*" >&2; }

usage() {
    sed -n '2,/^set -Eeuo/p' "$0" | sed -e '/^set -Eeuo/d' -e 's/^# \{0,1\}//'
}

ns() { echo "${PREFIX}-$1"; }

valid_role() {
    local r
    for r in "${ROLES[@]}"; do [[ "$r" == "$1" ]] && return 0; done
    return 1
}

check_prefix() {
    [[ "$PREFIX" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$ ]] ||
        die "bad --prefix '$PREFIX' (1-32 chars of A-Z a-z 0-9 _ . -, not starting with . or -)"
}

need_root() {
    [[ $EUID -eq 0 ]] || die "must run as root (network namespaces and iptables need CAP_NET_ADMIN)"
}

# Returns 0 when all hard requirements exist; prints install hints otherwise.
check_tools() {
    local ok=0
    if ! command -v ip >/dev/null 2>&1; then
        log "missing 'ip' (iproute2). Install: apt-get update && apt-get install -y iproute2"
        ok=1
    fi
    if ! command -v iptables >/dev/null 2>&1; then
        log "missing 'iptables'. Install: apt-get update && apt-get install -y iptables"
        ok=1
    fi
    if ! command -v conntrack >/dev/null 2>&1; then
        log "note: 'conntrack' (conntrack-tools) not installed; 'conntrack'/'direct' fall back to"
        log "      /proc/net/nf_conntrack when the kernel offers it. Install: apt-get install -y conntrack"
    fi
    return $ok
}

ns_exists() { [[ -e "/run/netns/$1" ]]; }

nsx() { # nsx ROLE CMD... : run in a role namespace
    local role=$1; shift
    ip netns exec "$(ns "$role")" "$@"
}

sysctl_ns() { # sysctl_ns ROLE key=value (failure tolerated for optional keys)
    nsx "$1" sysctl -q -w "$2" >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------- down
lab_down() {
    local role n pids pid any=0
    # 1. terminate processes still living in the lab's namespaces (by pid)
    for role in "${ROLES[@]}"; do
        n=$(ns "$role")
        ns_exists "$n" || continue
        pids=$(ip netns pids "$n" 2>/dev/null || true)
        if [[ -n "$pids" ]]; then
            log "terminating processes in $n: ${pids//$'\n'/ }"
            for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
            any=1
        fi
    done
    if [[ $any -eq 1 ]]; then
        for _ in $(seq 1 20); do # up to 2 s
            any=0
            for role in "${ROLES[@]}"; do
                n=$(ns "$role")
                ns_exists "$n" || continue
                [[ -n "$(ip netns pids "$n" 2>/dev/null || true)" ]] && any=1
            done
            [[ $any -eq 0 ]] && break
            sleep 0.1
        done
        for role in "${ROLES[@]}"; do
            n=$(ns "$role")
            ns_exists "$n" || continue
            for pid in $(ip netns pids "$n" 2>/dev/null || true); do
                log "killing $pid in $n"
                kill -KILL "$pid" 2>/dev/null || true
            done
        done
    fi
    # 2. delete the namespaces (their veths and the bridge go with them)
    for role in "${ROLES[@]}"; do
        n=$(ns "$role")
        if ns_exists "$n"; then
            ip netns del "$n" 2>/dev/null || log "could not delete namespace $n"
        fi
    done
    rm -f "$STATE_DIR/$PREFIX.env"
    rmdir "$STATE_DIR" 2>/dev/null || true
    for role in "${ROLES[@]}"; do
        ns_exists "$(ns "$role")" && die "namespace $(ns "$role") still exists after down"
    done
    return 0
}

# ---------------------------------------------------------------- up
veth() { # veth ROLE1 IF1 ROLE2 IF2 : veth pair created directly inside the namespaces
    ip link add name "$2" netns "$(ns "$1")" type veth peer name "$4" netns "$(ns "$3")"
}

router_setup() { # router_setup ROLE LAN_ADDR LAN_NET WAN_ADDR
    local r=$1 lan_addr=$2 lan_net=$3 wan_addr=$4 mode=()
    nsx "$r" ip addr add "$wan_addr/24" dev wan
    nsx "$r" ip addr add "$lan_addr/24" dev lan
    nsx "$r" ip link set wan up
    nsx "$r" ip link set lan up
    nsx "$r" ip route add default via "$INET_GW" dev wan
    nsx "$r" "$GATEWAY" blackholes
    sysctl_ns "$r" net.ipv4.ip_forward=1
    [[ $SYMMETRIC -eq 1 ]] && mode=(--symmetric)
    nsx "$r" "$GATEWAY" rules wan lan "$lan_net" "${mode[@]}"
}

host_setup() { # host_setup ROLE ADDR GW
    nsx "$1" ip addr add "$2/24" dev eth0
    nsx "$1" ip link set eth0 up
    nsx "$1" ip route add default via "$3" dev eth0
}

write_state() {
    mkdir -p "$STATE_DIR"
    cat >"$STATE_DIR/$PREFIX.env" <<EOF
LAB_PREFIX=$PREFIX
LAB_SYMMETRIC=$SYMMETRIC
NS_INET=$(ns inet)
NS_PUB=$(ns pub)
NS_RTRA=$(ns rtra)
NS_RTRB=$(ns rtrb)
NS_HOSTA=$(ns hosta)
NS_HOSTB=$(ns hostb)
PUB_IP=$PUB_IP
RTRA_WAN=$RTRA_WAN
RTRB_WAN=$RTRB_WAN
RTRA_LAN=$RTRA_LAN
RTRB_LAN=$RTRB_LAN
HOSTA_IP=$HOSTA_IP
HOSTB_IP=$HOSTB_IP
LANA_NET=$LANA_NET
LANB_NET=$LANB_NET
EOF
}

lab_is_up() { # lab already complete with the requested mode?
    local f="$STATE_DIR/$PREFIX.env" role
    [[ -f "$f" ]] || return 1
    grep -qx "LAB_SYMMETRIC=$SYMMETRIC" "$f" || return 1
    for role in "${ROLES[@]}"; do ns_exists "$(ns "$role")" || return 1; done
    return 0
}

lab_up() {
    check_tools || die "required tools missing (see above)"
    if lab_is_up; then
        log "lab '$PREFIX' already up (symmetric=$SYMMETRIC)"
        return 0
    fi
    lab_down # clean slate: removes leftovers of a partial or differently configured lab
    trap 'log "up failed; cleaning up"; lab_down; exit 1' ERR

    local role
    for role in "${ROLES[@]}"; do
        ip netns add "$(ns "$role")"
        nsx "$role" ip link set lo up
        sysctl_ns "$role" net.ipv6.conf.all.disable_ipv6=1
        sysctl_ns "$role" net.ipv6.conf.default.disable_ipv6=1
    done

    # the internet: one bridge; addressed so routers have a default gateway
    # that silently drops everything it would have to forward
    nsx inet ip link add br0 type bridge
    sysctl_ns inet net.bridge.bridge-nf-call-iptables=0
    sysctl_ns inet net.bridge.bridge-nf-call-ip6tables=0
    sysctl_ns inet net.bridge.bridge-nf-call-arptables=0
    veth pub eth0 inet p-pub
    veth rtra wan inet p-rtra
    veth rtrb wan inet p-rtrb
    local p
    for p in p-pub p-rtra p-rtrb; do
        nsx inet ip link set "$p" master br0
        nsx inet ip link set "$p" up
    done
    nsx inet ip addr add "$INET_GW/24" dev br0
    nsx inet ip link set br0 up
    sysctl_ns inet net.ipv4.ip_forward=1
    nsx inet iptables -w -P FORWARD DROP # routed (non-bridged) traffic goes nowhere

    # the public host
    nsx pub ip addr add "$PUB_IP/24" dev eth0
    nsx pub ip link set eth0 up
    nsx pub ip route add default via "$INET_GW" dev eth0
    nsx pub "$GATEWAY" blackholes

    # home networks
    veth rtra lan hosta eth0
    veth rtrb lan hostb eth0
    router_setup rtra "$RTRA_LAN" "$LANA_NET" "$RTRA_WAN"
    router_setup rtrb "$RTRB_LAN" "$LANB_NET" "$RTRB_WAN"
    host_setup hosta "$HOSTA_IP" "$RTRA_LAN"
    host_setup hostb "$HOSTB_IP" "$RTRB_LAN"

    write_state
    trap - ERR

    # smoke test: links up, bridge forwarding (bounded: 1 ping each, 2 s)
    local t
    if command -v ping >/dev/null 2>&1; then
        for t in "$RTRA_WAN" "$RTRB_WAN"; do
            nsx pub ping -c 1 -W 2 -q "$t" >/dev/null 2>&1 ||
                log "warning: pub cannot ping $t"
        done
    fi
    log "lab '$PREFIX' up (symmetric=$SYMMETRIC): pub=$PUB_IP rtra=$RTRA_WAN rtrb=$RTRB_WAN hosta=$HOSTA_IP hostb=$HOSTB_IP"
}

# ---------------------------------------------------------------- queries
lab_env() {
    local f="$STATE_DIR/$PREFIX.env"
    [[ -f "$f" ]] || die "lab '$PREFIX' is not up"
    cat "$f"
}

lab_status() {
    local role n
    for role in "${ROLES[@]}"; do
        n=$(ns "$role")
        if ns_exists "$n"; then
            echo "== $n"
            ip -n "$n" -4 -brief addr show | grep -v '^lo ' || true
        else
            echo "== $n (absent)"
        fi
    done
    for role in rtra rtrb; do
        n=$(ns "$role")
        ns_exists "$n" || continue
        echo "== $n nat"
        nsx "$role" iptables -w -t nat -S POSTROUTING
        echo "== $n filter"
        nsx "$role" iptables -w -S
    done
}

dump_conntrack() { # dump_conntrack ROLE [conntrack ARGS...]
    local role=$1; shift
    ns_exists "$(ns "$role")" || die "namespace $(ns "$role") does not exist (is the lab up?)"
    if command -v conntrack >/dev/null 2>&1; then
        # conntrack prints its summary line on stderr
        nsx "$role" conntrack -L "$@" 2>/dev/null
    elif nsx "$role" test -r /proc/net/nf_conntrack; then
        nsx "$role" cat /proc/net/nf_conntrack
    else
        die "neither conntrack(8) nor /proc/net/nf_conntrack available. Install: apt-get install -y conntrack"
    fi
}

lab_direct() { # flows between the two routers' public addresses, on both routers
    local proto=$1 found_a found_b filt='\[UNREPLIED\]'
    local a=${RTRA_WAN//./\\.} b=${RTRB_WAN//./\\.}
    [[ $SHOW_ALL -eq 1 ]] && filt='^$'
    local want=' '
    [[ -n "$STATE" ]] && want=" $STATE "

    # rtra's entry: original src hosta -> rtrb's WAN (either side may have initiated,
    # so accept both directions in either tuple)
    found_a=$(dump_conntrack rtra | grep -E "(^| )$proto +[0-9]+ " |
        grep -E "(dst=$b .*dst=$a )|(src=$b .*src=$a )" |
        grep -Ev "$filt" | grep -F -- "$want" || true)
    found_b=$(dump_conntrack rtrb | grep -E "(^| )$proto +[0-9]+ " |
        grep -E "(dst=$a .*dst=$b )|(src=$a .*src=$b )" |
        grep -Ev "$filt" | grep -F -- "$want" || true)
    echo "# rtra ($RTRA_WAN) $proto flows with rtrb ($RTRB_WAN):"
    [[ -n "$found_a" ]] && echo "$found_a"
    echo "# rtrb ($RTRB_WAN) $proto flows with rtra ($RTRA_WAN):"
    [[ -n "$found_b" ]] && echo "$found_b"
    [[ -n "$found_a" && -n "$found_b" ]]
}

lab_portfwd() { # lab_portfwd add|remove ROUTER PORT
    local op=$1 r=$2 port=$3 host_ip
    case "$r" in
        rtra) host_ip=$HOSTA_IP ;;
        rtrb) host_ip=$HOSTB_IP ;;
        *) die "portfwd: router must be rtra or rtrb" ;;
    esac
    [[ "$port" =~ ^[0-9]+$ && $port -ge 1 && $port -le 65535 ]] || die "portfwd: bad port '$port'"
    ns_exists "$(ns "$r")" || die "namespace $(ns "$r") does not exist (is the lab up?)"
    local dnat=(PREROUTING -i wan -p tcp --dport "$port" -j DNAT --to-destination "$host_ip:$port")
    local fwd=(FORWARD -i wan -o lan -p tcp -d "$host_ip" --dport "$port" -m conntrack --ctstate NEW -j ACCEPT)
    if [[ $op == add ]]; then
        # idempotent: only add what is missing
        nsx "$r" iptables -w -t nat -C "${dnat[@]}" 2>/dev/null ||
            nsx "$r" iptables -w -t nat -A "${dnat[@]}"
        nsx "$r" iptables -w -C "${fwd[@]}" 2>/dev/null || nsx "$r" iptables -w -A "${fwd[@]}"
    else
        while nsx "$r" iptables -w -t nat -D "${dnat[@]}" 2>/dev/null; do :; done
        while nsx "$r" iptables -w -D "${fwd[@]}" 2>/dev/null; do :; done
    fi
}

# ---------------------------------------------------------------- main
[[ $# -ge 1 ]] || { usage; exit 2; }
cmd=$1; shift

# options common to all subcommands (before ROLE for exec/conntrack)
args=()
PROTO=tcp
SHOW_ALL=0
REMOVE=0
STATE=
while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) [[ $# -ge 2 ]] || die "--prefix needs a value"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#--prefix=}; shift ;;
        --symmetric) SYMMETRIC=1; shift ;;
        --all) SHOW_ALL=1; shift ;;
        --remove) REMOVE=1; shift ;;
        --state) [[ $# -ge 2 ]] || die "--state needs a value"; STATE=$2; shift 2 ;;
        --proto) [[ $# -ge 2 ]] || die "--proto needs a value"; PROTO=$2; shift 2 ;;
        --) shift; args+=("$@"); break ;;
        *) args+=("$@"); break ;; # first non-option: the rest is positional
    esac
done
check_prefix

case "$cmd" in
    up)
        need_root
        [[ ${#args[@]} -eq 0 ]] || die "up: unexpected arguments: ${args[*]}"
        lab_up ;;
    down)
        need_root
        [[ ${#args[@]} -eq 0 ]] || die "down: unexpected arguments: ${args[*]}"
        [[ $SYMMETRIC -eq 0 ]] || die "down: --symmetric is meaningless here"
        lab_down
        log "lab '$PREFIX' down" ;;
    exec)
        need_root
        [[ ${#args[@]} -ge 2 ]] || die "usage: exec [--prefix NAME] ROLE CMD..."
        role=${args[0]}
        valid_role "$role" || die "unknown role '$role' (one of: ${ROLES[*]})"
        ns_exists "$(ns "$role")" || die "namespace $(ns "$role") does not exist (is the lab up?)"
        exec ip netns exec "$(ns "$role")" "${args[@]:1}" ;;
    env)
        lab_env ;;
    status)
        lab_status ;;
    conntrack)
        need_root
        [[ ${#args[@]} -ge 1 ]] || die "usage: conntrack [--prefix NAME] ROLE [ARGS...]"
        role=${args[0]}
        valid_role "$role" || die "unknown role '$role' (one of: ${ROLES[*]})"
        dump_conntrack "$role" "${args[@]:1}" ;;
    direct)
        need_root
        [[ "$PROTO" == tcp || "$PROTO" == udp ]] || die "--proto must be tcp or udp"
        lab_direct "$PROTO" ;;
    portfwd)
        need_root
        [[ ${#args[@]} -eq 2 ]] || die "usage: portfwd [--prefix NAME] [--remove] rtra|rtrb PORT"
        if [[ $REMOVE -eq 1 ]]; then lab_portfwd remove "${args[0]}" "${args[1]}"
        else lab_portfwd add "${args[0]}" "${args[1]}"; fi ;;
    check)
        check_tools && log "ok" ;;
    -h|--help|help)
        usage ;;
    *)
        usage >&2; exit 2 ;;
esac
