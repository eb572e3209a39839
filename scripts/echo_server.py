#!/usr/bin/env python3
"""A TCP echo server for trying tunnels: sends back every byte it receives.

    python3 scripts/echo_server.py --port 7777 [--host 127.0.0.1]

Half-close aware: when a client shuts down its write side, the server finishes
echoing what it got and then closes its own write side. Stops on Ctrl+C.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading


def serve_client(conn: socket.socket) -> None:
    with conn:
        while True:
            data = conn.recv(256 * 1024)
            if not data:
                break
            conn.sendall(data)
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7777)
    args = parser.parse_args()
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((args.host, args.port))
    server.listen(128)
    print(f"echo server listening on {args.host}:{server.getsockname()[1]}", file=sys.stderr, flush=True)
    try:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve_client, args=(conn,), daemon=True).start()
    except KeyboardInterrupt:
        return 0
    finally:
        server.close()


if __name__ == "__main__":
    raise SystemExit(main())
