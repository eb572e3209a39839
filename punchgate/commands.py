"""``punchgate up``, ``down``, ``status`` and ``logs``: parsing and exit codes.

Exit status: 0 done; 1 could not (no node running, no service manager, a failed
systemctl/launchctl call); 2 bad usage. Errors are one line on stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from punchgate.config import UsageError, _OneLineParser


def _parser(name: str, description: str) -> _OneLineParser:
    return _OneLineParser(prog=f"punchgate {name}", description=description)


def _fail(message: str, status: int = 1) -> int:
    print(f"punchgate: error: {message}", file=sys.stderr)
    return status


def run_subcommand(name: str, argv: Sequence[str]) -> int:
    from punchgate.service import ServiceError

    try:
        commands = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "logs": cmd_logs, "connect": cmd_connect}
        return commands[name](list(argv))
    except UsageError as exc:
        return _fail(str(exc), 2)
    except ServiceError as exc:
        return _fail(str(exc), 1)


def cmd_up(argv: list[str]) -> int:
    from punchgate.config import build_arg_parser
    from punchgate.service import manager_for, up

    if argv and argv[0] in ("-h", "--help"):
        parser = build_arg_parser()
        parser.prog = "punchgate up"
        parser.description = (
            "Install (or update) and start punchgate as a per-user service with these node flags "
            "(systemd --user on Linux, launchd on macOS). Running it again replaces the configuration "
            "and restarts the service."
        )
        parser.epilog = None
        parser.print_help()
        return 0
    print(up(argv, manager_for()))
    return 0


def cmd_down(argv: list[str]) -> int:
    from punchgate.service import down, manager_for

    _parser("down", "Stop, disable and remove the per-user punchgate service.").parse_args(argv)
    print(down(manager_for()))
    return 0


def cmd_logs(argv: list[str]) -> int:
    from punchgate.service import ServiceError, manager_for

    parser = _parser("logs", "Show the punchgate service's log (journald on Linux, the log file on macOS).")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C ends)")
    parser.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="last N lines (default 50)")
    args = parser.parse_args(argv)
    if args.lines < 0:
        raise UsageError("--lines", str(args.lines), "must be 0 or more", "100")
    manager = manager_for()
    manager.check()
    if not manager.installed():
        raise ServiceError("no punchgate service is installed (start one with `punchgate up [flags]`)")
    return manager.logs(args.follow, args.lines)


def cmd_status(argv: list[str]) -> int:
    from punchgate.service import ServiceError, manager_for
    from punchgate.status import NodeNotRunning, print_status, query
    from punchgate.userdirs import default_control_socket

    parser = _parser("status", "Show the running node's status (and the service's, if installed).")
    parser.add_argument("--control-socket", metavar="PATH", help="the node's control socket (default: as the node's)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    args = parser.parse_args(argv)
    path = Path(args.control_socket).expanduser() if args.control_socket else default_control_socket()

    service = None
    try:
        manager = manager_for()
        if manager.installed():
            manager.check()
            service = manager.view()
    except ServiceError:
        service = None  # no service manager here: only the live status

    try:
        status = query(path)
    except NodeNotRunning as exc:
        if service is not None and not args.json:
            print_status({}, service, only_service=True)
        return _fail(str(exc), 1)
    if "error" in status and "peer_id" not in status:
        return _fail(f"the node answered: {status['error']}", 1)
    if args.json:
        if service is not None:
            status["service"] = service
        print(json.dumps(status, indent=None, sort_keys=False))
    else:
        print_status(status, service)
    return 0


def cmd_connect(argv: list[str]) -> int:
    from punchgate.connect import main
    from punchgate.userdirs import default_control_socket

    parser = _parser(
        "connect",
        "Join standard input and output to SERVICE through the running node, e.g. "
        "ssh -o ProxyCommand='punchgate connect ssh' host. Exit 1 with the reason on stderr when the "
        "node cannot reach it.",
    )
    parser.add_argument("target", metavar="[PEER_ID:]SERVICE", help="a service by name, or on one peer")
    parser.add_argument("--control-socket", metavar="PATH", help="the node's control socket (default: as the node's)")
    args = parser.parse_args(argv)
    path = Path(args.control_socket).expanduser() if args.control_socket else default_control_socket()
    return main([args.target], path)
