#!/usr/bin/env python3
"""How long a node behind a symmetric NAT takes to map a port and advertise the mapped address.

One namespace lab (``scripts/netns_lab.sh``, both routers ``--random-fully``) with Debian's
miniupnpd on router A (``punchgate/devtools/upnplab.py``, as in ``tests/test_port_mapping.py``)
and pub as the bootstrap node. The provider (hosta, ``--expose echo``) is started, stopped
with SIGTERM and started again, ``--runs`` times; for each start the script reads its log:

* ``port mapped``: the gateway granted the mapping;
* ``advertised``: the ``advertising`` event that carries the mapped address (a dial-back
  through it got through first), i.e. what peers are told from then on;
* ``removed``: the mapping was taken off the router at the stop (checked in its nft rules).

Times are seconds from the process start (Python start-up included) and from the node's
first log line (``punchgate starting``). Prints each run and the median, min and max.

    sudo .venv/bin/python scripts/bench_portmap.py [--runs 5] [--method natpmp|upnp] [--json FILE]

Needs root, ``ip``, ``iptables``, ``nft`` and ``miniupnpd``. The lab is torn down, also on
errors and Ctrl+C.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from punchgate.devtools.natlab import ECHO_PORT, NODE_PORT, PUB_IP, NatLab  # noqa: E402
from punchgate.devtools.upnplab import PortMappingRouter  # noqa: E402


class RunFailed(Exception):
    pass


def logged_at(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def one_start(lab: NatLab, router: PortMappingRouter, bootstrap: str, method: str, first: bool) -> dict:
    if first:
        lab.node("hosta", "hosta", "--bootstrap", bootstrap, "--expose", f"echo=127.0.0.1:{ECHO_PORT}")
    else:
        lab.start_again("hosta")
    node = lab.nodes["hosta"]
    starting = logged_at(lab.expect("hosta", "punchgate starting", 30))
    mapped = lab.expect("hosta", "port mapped", 30, method=method)
    address = mapped["addresses"][0]
    advertised = node.wait_for(
        lambda e: e.get("event") == "advertising" and any(a.startswith(address + "/") for a in e.get("addresses", ())),
        30,
    )
    port = int(address.rsplit("/", 1)[1])
    held = [external for external, _, _ in router.redirects()]
    code = lab.stop("hosta")
    removed = port not in [external for external, _, _ in router.redirects()]
    if port not in held or code != 0 or not removed:
        raise RunFailed(f"mapping {address}: on the router {port in held}, exit {code}, removed {removed}")
    return {
        "address": address,
        "mapped_s": round(logged_at(mapped) - node.started_at, 3),
        "advertised_s": round(logged_at(advertised) - node.started_at, 3),
        "advertised_after_first_line_s": round(logged_at(advertised) - starting, 3),
        "removed": removed,
    }


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="provider starts (default 5)")
    parser.add_argument("--method", choices=("natpmp", "upnp"), default="natpmp",
                        help="natpmp: miniupnpd offers both (NAT-PMP is asked first); upnp: NAT-PMP off")
    parser.add_argument("--json", metavar="FILE", help="also write every run's values here")
    args = parser.parse_args()

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl+C, so the lab is torn down
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-portmap-") as workdir:
        lab = NatLab(Path(workdir), "pgbm", symmetric=True, failure=RunFailed)
        try:
            lab.up(timeout=120)
            router = PortMappingRouter(lab, Path(workdir) / "router", natpmp=args.method == "natpmp")
            router.start()
            lab.node("pub", "pub")
            pub_id = lab.expect("pub", "punchgate starting", 30)["peer_id"]
            lab.expect("pub", "phase transition", 30, to_phase="ready")
            lab.start_echo_server()
            bootstrap = f"/ip4/{PUB_IP}/tcp/{NODE_PORT}/p2p/{pub_id}"
            for n in range(args.runs):
                result = one_start(lab, router, bootstrap, args.method, first=n == 0)
                runs.append(result)
                print(f"run {n + 1}: {json.dumps(result)}", flush=True)
        except RunFailed as exc:
            print(f"run failed: {exc}\n{lab.report()}", file=sys.stderr)
            return 1
        finally:
            lab.close()
    print(f"{args.method}, {len(runs)} starts behind a symmetric NAT:")
    print(f"  start -> port mapped:             {summary([r['mapped_s'] for r in runs])}")
    print(f"  start -> mapped address advertised: {summary([r['advertised_s'] for r in runs])}")
    print(f"  first log line -> advertised:      {summary([r['advertised_after_first_line_s'] for r in runs])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"method": args.method, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
