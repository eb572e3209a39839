#!/usr/bin/env bash
# The README's four-terminal flow, automated: echo server, peer B exposing it, peer A
# tunnelling to it, a payload through the tunnel, then cleanup. Logs land in logs/.
#
#   ./scripts/e2e_tunnel_test.sh            (uses .venv, creating it if needed)
#   PUNCHGATE=/path/to/punchgate ./scripts/e2e_tunnel_test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOGS=$ROOT/logs
mkdir -p "$LOGS"
TMP=$(mktemp -d -t punchgate-e2e-XXXXXX)

if [ -z "${PUNCHGATE:-}" ]; then
    if [ ! -x .venv/bin/punchgate ]; then
        python3 -m venv .venv
        .venv/bin/pip install --quiet --disable-pip-version-check -e .
    fi
    PUNCHGATE=$ROOT/.venv/bin/punchgate
    PYTHON=$ROOT/.venv/bin/python
else
    PYTHON=${PYTHON:-python3}
fi

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ECHO_PORT=$(free_port)
TUNNEL_PORT=$(free_port)
PIDS=()

cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    cp "$TMP"/*.log "$LOGS"/ 2>/dev/null || true
    if [ $status -eq 0 ]; then rm -rf "$TMP"; else echo "FAILED; raw logs kept in $TMP" >&2; fi
    echo "logs saved in $LOGS/"
}
trap cleanup EXIT

# wait_for FILE PATTERN SECONDS: poll a log file until a line matches (bounded).
wait_for() {
    local file=$1 pattern=$2 seconds=$3 i
    for ((i = 0; i < seconds * 10; i++)); do
        if grep -q -- "$pattern" "$file" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "timed out after ${seconds}s waiting for '$pattern' in $file" >&2
    cat "$file" >&2
    return 1
}

echo "1. echo server on 127.0.0.1:$ECHO_PORT"
"$PYTHON" scripts/echo_server.py --port "$ECHO_PORT" 2>"$TMP/echo.log" & PIDS+=($!)
wait_for "$TMP/echo.log" "listening" 10

echo "2. peer B exposes echo"
"$PUNCHGATE" --identity "$TMP/peer-b.key" --listen /ip4/127.0.0.1/tcp/0 --listen /ip4/127.0.0.1/udp/0/quic-v1 \
    --expose "echo=127.0.0.1:$ECHO_PORT" --log-format json 2>"$TMP/peer-b.log" & PIDS+=($!)
wait_for "$TMP/peer-b.log" '"to_phase": "ready"' 30
PEER_B_ID=$("$PYTHON" -c 'import json,sys; print(next(json.loads(l)["peer_id"] for l in open(sys.argv[1]) if "punchgate starting" in l))' "$TMP/peer-b.log")
PEER_B_ADDR=$("$PYTHON" -c 'import json,sys; print(next(json.loads(l)["address"] for l in open(sys.argv[1]) if "listening on" in l and "/tcp/" in l))' "$TMP/peer-b.log")
echo "   peer B: $PEER_B_ADDR"

echo "3. peer A tunnels 127.0.0.1:$TUNNEL_PORT to B's echo"
"$PUNCHGATE" --identity "$TMP/peer-a.key" --listen /ip4/127.0.0.1/tcp/0 \
    --bootstrap "$PEER_B_ADDR" --tunnel "$PEER_B_ID:echo@127.0.0.1:$TUNNEL_PORT" \
    --log-format json 2>"$TMP/peer-a.log" & PIDS+=($!)
wait_for "$TMP/peer-a.log" '"to_phase": "ready"' 30

echo "4. payload through the tunnel"
"$PYTHON" - "$TUNNEL_PORT" <<'PY'
import hashlib, os, socket, sys, threading
port = int(sys.argv[1])
with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
    s.sendall(b"hello punchgate\n")
    s.shutdown(socket.SHUT_WR)
    reply = b"".join(iter(lambda: s.recv(65536), b""))
assert reply == b"hello punchgate\n", reply
print("   echoed:", reply.decode().strip())
payload = os.urandom(8 * 1024 * 1024)
with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
    t = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
    t.start()
    got = hashlib.sha256(b"".join(iter(lambda: s.recv(1 << 20), b""))).hexdigest()
    t.join()
assert got == hashlib.sha256(payload).hexdigest(), "sha256 mismatch"
print("   8 MiB echoed, sha256 matches")
PY
wait_for "$TMP/peer-a.log" "client tunnel closed" 10
echo "PASS"
