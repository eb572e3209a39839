"""The ``punchgate`` command: parse the configuration, load the identity, run the node.

``punchgate up|down|status|logs`` are the service-mode and status commands and
``punchgate connect`` joins stdin/stdout to a service (``punchgate/commands.py``);
``punchgate network-key new PATH`` makes a private-network key (``punchgate/netkey.py``);
anything else runs the node.

Exit status: 0 after a clean shutdown, 1 when the node cannot start (identity file,
network key, allow file, taken port), 2 for a bad flag or variable (one line on stderr
says which and how).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from punchgate.config import Config, UsageError, parse_config

SUBCOMMANDS = ("up", "down", "status", "logs", "connect")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        from punchgate.commands import run_subcommand

        return run_subcommand(argv[0], argv[1:])
    if argv[:1] == ["network-key"]:
        from punchgate.netkey import main as network_key_main

        return network_key_main(argv[1:])
    try:
        config = parse_config(argv, os.environ)
    except UsageError as exc:
        print(f"punchgate: error: {exc}", file=sys.stderr)
        return 2
    return run(config)


def run(config: Config) -> int:
    # libp2p is imported only now: it takes a second or two, and usage errors should not wait.
    import trio

    from punchgate import __version__
    from punchgate.allocator import keep_buffers_in_heap
    from punchgate.fdlimit import descriptors_needed, raise_open_files_limit
    from punchgate.identity import IdentityError, load_or_create_identity
    from punchgate.logs import configure_logging, get_logger
    from punchgate.netkey import NetworkKeyError
    from punchgate.runtime.access_control import AllowFileError
    from punchgate.runtime.node import Node

    keep_buffers_in_heap()
    if config.control_socket is None:
        from dataclasses import replace

        from punchgate.userdirs import default_control_socket

        config = replace(config, control_socket=default_control_socket({}))
    open_files = raise_open_files_limit()
    configure_logging(config.log_format, config.log_level)
    log = get_logger("punchgate")
    if open_files < descriptors_needed(config.limits):
        log.warning(
            "open files limit below the caps",
            limit=open_files,
            needed=descriptors_needed(config.limits),
            fix="raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower --limit tunnel_sessions / inbound_conns",
        )
    try:
        key_pair, created = load_or_create_identity(config.identity)
    except IdentityError as exc:
        log.error("identity error", reason=str(exc))
        return 1
    try:
        node = Node(config, key_pair)
    except (NetworkKeyError, AllowFileError) as exc:
        log.error("cannot start", reason=str(exc))
        return 1
    log.info(
        "punchgate starting",
        version=__version__,
        peer_id=str(node.peer_id),
        identity=str(config.identity),
        identity_created=created,
    )
    try:
        trio.run(node.run)
    except OSError as exc:
        log.error("cannot start", reason=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
