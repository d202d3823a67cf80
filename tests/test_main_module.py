"""``python -m dsc`` runs the command line (the package has a ``__main__``)."""
import subprocess
import sys


def test_python_m_dsc_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "dsc", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: dsc"), r.stdout[:200]
    for word in ("demo", "calibrate", "explain", "bench", "eval"):
        assert word in r.stdout


def test_python_m_dsc_bad_command_fails():
    r = subprocess.run([sys.executable, "-m", "dsc", "no-such-command"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr
