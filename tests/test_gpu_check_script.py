"""``scripts/gpu_check.sh`` (issue 12 hygiene): it installs into a private temp folder (mktemp -d) that it puts on
PYTHONPATH and removes on exit, never a fixed shared /tmp path. Run here with stand-ins for ``nvidia-smi`` and
``python3`` that record what they were given."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("mktemp") is None, reason="needs bash and mktemp")
def test_gpu_check_uses_a_private_site_folder_and_removes_it(tmp_path):
    bin_dir, tmp, work, log = tmp_path / "bin", tmp_path / "tmp", tmp_path / "work", tmp_path / "calls.log"
    for d in (bin_dir, tmp, work):
        d.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake GPU, 1 MiB, 0'\n")
    # python3 stand-in: record PYTHONPATH's first entry, whether the backend's dist-info is there, and its mode
    (bin_dir / "python3").write_text(
        "#!/bin/sh\nsite=${PYTHONPATH%%:*}\n"
        f"echo \"$site|$DSC_CACHE|$TORCHINDUCTOR_CACHE_DIR|$(cat \"$site/dsc-0.1.0.dist-info/entry_points.txt\" "
        f"| tail -1)|$(stat -c %a \"$site/..\")\" >> {log}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DSC_CACHE", "TORCHINDUCTOR_CACHE_DIR", "PYTHONPATH")}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", TMPDIR=str(tmp), OUT=str(tmp_path / "out"))
    r = subprocess.run(["bash", str(SCRIPT)], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert len(calls) >= 5  # the machine line, the tests and the benchmarks all ran python3
    sites = {c.split("|")[0] for c in calls}
    assert len(sites) == 1
    site = Path(sites.pop())
    assert site.parent.parent == tmp and site.parent.name.startswith("dsc-gpu-check.")  # private, under $TMPDIR
    assert all(c.split("|")[1:4] == [str(site.parent / "dsc-cache"), str(site.parent / "inductor"),
                                     "dsparse = dsc.backend:dsparse"] for c in calls)
    assert all(c.split("|")[4] == "700" for c in calls)  # mktemp -d: only its owner can plant files there
    assert list(tmp.iterdir()) == []  # removed on exit
