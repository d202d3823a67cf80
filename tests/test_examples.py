"""The examples run, with tiny settings, so they never rot."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs():
    # 640 prompt tokens at 1/8: 80 slots per row, 20 of them forced sink/recent, so the labels choose 60 of 620
    cmd = [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--prompt-tokens", "640", "--max-new-tokens",
           "3", "--inner", "eager", "--calib-tokens", "1024"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"sparse attention calls: (\d+)", res.stdout)
    assert m and int(m.group(1)) == 2 * 28, res.stdout  # 2 decode steps x 28 sparse layers
    assert re.search(r"first 3 of 3 tokens identical", res.stdout), res.stdout
