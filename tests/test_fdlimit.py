"""The open-file limit is raised at start, and a node says when it stays below its caps."""

from __future__ import annotations

import resource
import subprocess
import sys

from punchgate.fdlimit import descriptors_needed
from punchgate.limits import Limits

PROBE = "import resource; from punchgate.fdlimit import raise_open_files_limit as r; print(r(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"


def limited(soft: int, hard: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_soft_limit_is_raised_to_the_hard_one():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                         preexec_fn=limited(512, 4096), check=True).stdout.split()
    assert out == ["4096", "4096"]


def test_a_node_warns_when_the_hard_limit_is_below_its_caps(tmp_path):
    assert descriptors_needed(Limits()) > 1024
    command = [sys.executable, "-m", "punchgate", "--log-format", "json", "--identity", str(tmp_path / "n.key"),
               "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"]
    node = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=limited(256, 1024))
    try:
        for line in node.stderr:  # the warning comes before "punchgate starting"
            assert '"punchgate starting"' not in line, "no warning before the start line"
            if '"open files limit below the caps"' in line:
                assert '"limit": 1024' in line and "tunnel_sessions" in line
                break
        else:
            raise AssertionError("the node exited without the warning")
    finally:
        node.kill()
        node.wait(timeout=10)
