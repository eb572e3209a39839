#!/usr/bin/env python3
"""A TCP echo server for trying tunnels: sends back every byte it receives.

    python3 scripts/echo_server.py --port 7777 [--host 127.0.0.1]

Half-close aware: when a client shuts down its write side, the server finishes
echoing and shuts down its own. Stops on Ctrl+C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout, installed or not

from punchgate.devtools.echo import EchoServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description="TCP echo server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7777)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EchoServer(args.host, args.port) as server:
        print(f"echo server listening on {args.host}:{server.port}", file=sys.stderr, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
