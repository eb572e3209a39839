#!/bin/sh
# nat_gateway.sh - the NAT gateway ("home router") of the two-NAT topology, for the
# network-namespace lab (scripts/netns_lab.sh) and the compose topology (compose/compose.yaml)
# alike, so that both NATs behave the same.
#
#   nat_gateway.sh rules WAN_IF LAN_IF LAN_NET [--symmetric]
#       iptables rules on this host/namespace:
#       * MASQUERADE LAN_NET -> WAN_IF: port preserving ("cone-like"); with --symmetric
#         --random-fully, so every flow gets a random public port;
#       * FORWARD policy DROP except LAN -> WAN and ESTABLISHED,RELATED back;
#       * INPUT policy DROP except loopback, ESTABLISHED,RELATED, the LAN and ICMP echo.
#       Unsolicited inbound traffic is dropped silently (no RST), like a typical home router.
#   nat_gateway.sh blackholes
#       routes that silently drop private destinations (10/8, 172.16/12, 192.168/16) other
#       than the networks directly attached: dialing someone else's LAN address times out,
#       as on the real internet.
#   nat_gateway.sh container WAN_ADDR LAN_ADDR LAN_NET [--symmetric]
#       in a container (NET_ADMIN, net.ipv4.ip_forward=1): find the interfaces holding
#       WAN_ADDR and LAN_ADDR, apply blackholes and rules, print the rules, then wait
#       (the container's main process) until stopped.
set -eu

die() { echo "nat_gateway: error: $*" >&2; exit 1; }

rules() { # rules WAN_IF LAN_IF LAN_NET [--symmetric]
    wan=$1 lan=$2 lan_net=$3 extra=
    [ "${4:-}" = --symmetric ] && extra=--random-fully
    # shellcheck disable=SC2086
    iptables -w -t nat -A POSTROUTING -s "$lan_net" -o "$wan" -j MASQUERADE $extra
    iptables -w -P FORWARD DROP
    iptables -w -A FORWARD -i "$lan" -o "$wan" -j ACCEPT
    iptables -w -A FORWARD -i "$wan" -o "$lan" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    iptables -w -P INPUT DROP
    iptables -w -A INPUT -i lo -j ACCEPT
    iptables -w -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    iptables -w -A INPUT -i "$lan" -j ACCEPT
    iptables -w -A INPUT -p icmp --icmp-type echo-request -j ACCEPT
}

blackholes() {
    for net in 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16; do
        ip route add blackhole "$net"
    done
}

interface_with() { # interface_with ADDR: the interface holding ADDR
    ip -o -4 addr show | awk -v a="$1" '{ split($4, p, "/"); if (p[1] == a) { print $2; exit } }'
}

case "${1:-}" in
    rules)
        [ $# -ge 4 ] || die "usage: rules WAN_IF LAN_IF LAN_NET [--symmetric]"
        shift; rules "$@" ;;
    blackholes)
        blackholes ;;
    container)
        [ $# -ge 4 ] || die "usage: container WAN_ADDR LAN_ADDR LAN_NET [--symmetric]"
        wan_if=$(interface_with "$2"); lan_if=$(interface_with "$3")
        [ -n "$wan_if" ] || die "no interface holds $2"
        [ -n "$lan_if" ] || die "no interface holds $3"
        [ "$(cat /proc/sys/net/ipv4/ip_forward)" = 1 ] || die "net.ipv4.ip_forward is off (sysctl in compose.yaml)"
        blackholes
        rules "$wan_if" "$lan_if" "$4" "${5:-}"
        echo "nat_gateway: wan=$wan_if ($2) lan=$lan_if ($3) ${5:-port-preserving}: ready"
        iptables -w -t nat -S POSTROUTING
        trap 'exit 0' TERM INT
        while :; do sleep 3600 & wait $!; done ;;
    *)
        sed -n '2,/^set -eu/p' "$0" | sed -e '/^set -eu/d' -e 's/^# \{0,1\}//' >&2
        exit 2 ;;
esac
