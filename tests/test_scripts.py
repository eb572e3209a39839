"""The demo and the end-to-end script run as a newcomer would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_demo_runs_and_checks_its_payload():
    result = subprocess.run(
        [sys.executable, "-m", "punchgate.demo"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "got back 'hello punchgate'" in result.stdout
    assert "sha256 matches" in result.stdout
    assert result.stdout.count("stopped on SIGTERM: exit 0") == 2


def test_e2e_tunnel_script_passes_and_keeps_logs(tmp_path):
    env = {**os.environ, "PUNCHGATE": str(BIN / "punchgate"), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "e2e_tunnel_test.sh")],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 MiB echoed, sha256 matches" in result.stdout
    for name in ("peer-a.log", "peer-b.log", "echo.log"):
        assert (ROOT / "logs" / name).stat().st_size > 0
