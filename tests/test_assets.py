"""The embedded model's conversion cache (``dsc/assets.py``): temp folders of killed conversions are cleaned up by the
next call, converted files get ordinary permissions, and model dtypes are checked with a clear error. The GGUF
conversion itself is replaced by a stand-in that writes a few small files (the real one takes ~15 s and 0.5 GB)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dsc import assets


def _fake_convert(gguf_dir: Path, out: Path) -> None:
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"\0" * 64)
    (out / "sub").mkdir()
    (out / "sub" / "tokenizer.json").write_text("{}")


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg"
    gguf.mkdir()
    (gguf / assets.GGUF_FILE).write_bytes(b"GGUF")
    monkeypatch.setenv("DSC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_package_dir", lambda package, wheel: gguf)
    monkeypatch.setattr(assets, "_convert_gguf", _fake_convert)
    return tmp_path / "cache" / "models"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_converted_files_have_ordinary_permissions(fake_cache):
    old = os.umask(0o022)
    try:
        target = assets.default_model_path()
    finally:
        os.umask(old)
    assert target == fake_cache / assets.MODEL_NAME
    assert _mode(target) == 0o755 and _mode(target / "sub") == 0o755
    assert _mode(target / "model.safetensors") == 0o644 and _mode(target / "sub" / "tokenizer.json") == 0o644
    assert [p.name for p in fake_cache.iterdir()] == [assets.MODEL_NAME]  # no temp folder left


def test_umask_is_respected(fake_cache):
    old = os.umask(0o077)
    try:
        target = assets.default_model_path()
    finally:
        os.umask(old)
    assert _mode(target) == 0o700 and _mode(target / "config.json") == 0o600


def test_private_cache_of_an_earlier_version_is_opened_up(fake_cache):
    target = fake_cache / assets.MODEL_NAME
    target.mkdir(parents=True)
    _fake_convert(Path("."), target)
    os.chmod(target / "model.safetensors", 0o600)
    os.chmod(target, 0o700)
    old = os.umask(0o022)
    try:
        assert assets.default_model_path() == target
    finally:
        os.umask(old)
    assert _mode(target) == 0o755 and _mode(target / "model.safetensors") == 0o644


def test_conversion_killed_mid_write_is_cleaned_by_the_next_one(fake_cache, tmp_path):
    """A converter killed (SIGKILL: no finally, no atexit) while writing leaves its temp folder; the next
    conversion removes it at once (its process is gone) and converts."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from dsc import assets
        gguf = Path({str(tmp_path / "pkg")!r})
        assets._package_dir = lambda package, wheel: gguf
        def convert(gguf_dir, out):
            (out / "model.safetensors").write_bytes(b"half a model")
            os.kill(os.getpid(), signal.SIGKILL)
        assets._convert_gguf = convert
        assets.default_model_path()
    """)
    r = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    left = [p for p in fake_cache.iterdir() if p.name != assets.MODEL_NAME]
    assert len(left) == 1 and (left[0] / "model.safetensors").exists()  # what the kill leaves behind
    target = assets.default_model_path()
    assert sorted(p.name for p in fake_cache.iterdir()) == [assets.MODEL_NAME]
    assert (target / "config.json").exists()


def test_stale_temp_rules(fake_cache):
    """Removed: a dead process's folder (this host), any folder older than STALE_TEMP_S (also another host's and
    the 8-character mkdtemp names of earlier versions). Kept: a live conversion's, a fresh one from another host,
    an unrelated folder, and the model itself."""
    fake_cache.mkdir(parents=True)
    name, host = assets.MODEL_NAME, assets._host()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    old = time.time() - assets.STALE_TEMP_S - 60

    def make(folder: str, age: float | None = None) -> Path:
        p = fake_cache / folder
        p.mkdir()
        (p / "f").write_text("x")
        if age is not None:
            for q in (p / "f", p):
                os.utime(q, (age, age))
        return p

    gone = [make(f"{name}.tmp-{host}-{dead_pid}-abc"), make(f"{name}.tmp-{host}-{os.getpid()}-old", old),
            make(f"{name}.tmp-otherhost-1-x", old), make(f"{name}.k3j_x9q2", old)]
    kept = [make(f"{name}.tmp-{host}-{os.getpid()}-live"), make(f"{name}.tmp-otherhost-{dead_pid}-fresh"),
            make(f"{name}.abcdefgh"), make("unrelated.tmp-x-1-y", old), make(name, old)]
    removed = assets.clean_stale_temps(fake_cache / name)
    assert sorted(removed) == sorted(gone)
    assert all(not p.exists() for p in gone) and all(p.exists() for p in kept)


def test_dtype_errors_list_valid_dtypes():
    import torch

    assert assets.torch_dtype("bfloat16") is torch.bfloat16 and assets.torch_dtype(torch.float16) is torch.float16
    assert assets.torch_dtype("torch.float32") is torch.float32
    for bad in ("nosuch", "int8", torch.int64, "float8_e4m3fn", 3):
        with pytest.raises(ValueError, match="float32, bfloat16, float16, float64"):
            assets.torch_dtype(bad)
    with pytest.raises(ValueError, match="'nosuch' is not a model dtype"):
        assets.load_model("/no/such/folder", dtype="nosuch")  # the dtype is checked first
