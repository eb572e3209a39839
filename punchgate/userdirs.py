"""Where punchgate keeps a user's files (``platformdirs``): configuration, identity, logs,
and the control socket of a running node.

| what | Linux | macOS |
| --- | --- | --- |
| service configuration | ``~/.config/punchgate/punchgate.env`` | ``~/Library/Application Support/punchgate/punchgate.env`` |
| service identity | ``~/.local/share/punchgate/identity.key`` | ``~/Library/Application Support/punchgate/identity.key`` |
| service log (macOS only) | journald | ``~/Library/Logs/punchgate/punchgate.log`` |
| control socket | ``$XDG_RUNTIME_DIR/punchgate/control.sock`` | ``~/Library/Caches/TemporaryItems/punchgate/control.sock`` |

``PUNCHGATE_CONTROL_SOCKET`` overrides the control socket's place for the node and for
``punchgate status`` alike.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import platformdirs

APP = "punchgate"
CONTROL_SOCKET_ENV = "PUNCHGATE_CONTROL_SOCKET"


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP))


def env_file() -> Path:
    return config_dir() / "punchgate.env"


def data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def log_dir() -> Path:
    return Path(platformdirs.user_log_dir(APP))


def runtime_dir() -> Path:
    """The user's private runtime directory for punchgate (not created here)."""
    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR, recent platformdirs warn and use a private directory under /tmp.
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir(APP))


def default_control_socket(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    configured = env.get(CONTROL_SOCKET_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    return runtime_dir() / "control.sock"
