"""The native CPU decode kernel (``csrc/ds_decode_cpu.cpp``): label scores, top-k and attention over the selected
rows fused in one pass per (batch, KV head).

Built on first use with the machine's C++ compiler (``$CXX`` or ``c++``; a few seconds, no torch headers) into
``$DSC_CACHE/native`` (default ``~/.cache/dsc/native``), keyed by the source, the flags, the compiler and the CPU
(``-march=native``), then loaded with ctypes. Without a compiler the torch path in :mod:`.cpu` runs instead, with a
warning saying why; ``DSC_NATIVE=0`` chooses the torch path on purpose (no warning).

It covers the decode step the backend runs: one query position, every row valid on a prefix ``[0, n)`` (no mask;
``lengths`` allowed), no additive bias, fp32/bf16/fp16 K/V, any label format. :func:`covers` says whether a call is such a
step; the caller has validated the arguments (``checks.check_ds_decode``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "ds_decode_cpu.cpp"
# -fassociative-math (with the two flags it needs) lets the compiler vectorise the fp32 dot products and sums;
# NaN and inf keep their meaning (no -ffinite-math-only).
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno",
         "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math")
DTYPE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc Kind
CODE_KIND = {8: 3, 4: 4}
BUILD_TIMEOUT_S = 300

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = ([_PTR, _I64, _I64, _PTR, _PTR, ctypes.c_int] + [_I64] * 6 + [_PTR, _PTR, ctypes.c_int] + [_I64] * 3
             + [_PTR, _PTR, _I64, _I64, _PTR] + [_I64] * 9 + [ctypes.c_double, _I64, _I64, ctypes.c_int,
                                                             ctypes.c_float, _PTR, ctypes.c_int, _I64])

_WRITE_ARGTYPES = ([_PTR, ctypes.c_int] + [_I64] * 3 + [_PTR, _PTR, _PTR, ctypes.c_int] + [_I64] * 3 + [_PTR, _PTR]
                   + [_I64] * 6 + [ctypes.c_int])


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (Linux), else the machine name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    wanted = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return platform.machine() + "\n" + "\n".join(dict.fromkeys(wanted))


def _build(cxx: str) -> Path:
    """The compiled library, built now unless a matching one is cached. Raises ``RuntimeError`` saying why not."""
    from ..assets import cache_dir

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_signature()]).encode())
    target = cache_dir() / "native" / f"ds_decode_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=None)
def library():
    """The loaded kernel, or None (``DSC_NATIVE=0``, or it could not be built: warned once, with the reason)."""
    if os.environ.get("DSC_NATIVE", "1") == "0":
        return None
    cxx = _compiler()
    try:
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
        return load(_build(cxx))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"dsc: the native CPU decode kernel is unavailable, so CPU decoding takes the slower torch "
                      f"path: {err}", RuntimeWarning, stacklevel=2)
        return None


def load(path) -> ctypes.CDLL:
    """A build of the kernel's source at ``path``, its entry points typed (:func:`library`'s, or a measuring
    script's own build)."""
    lib = ctypes.CDLL(str(path))
    lib.dsc_ds_decode.argtypes = _ARGTYPES
    lib.dsc_ds_decode.restype = ctypes.c_int
    lib.dsc_label_write.argtypes = _WRITE_ARGTYPES
    lib.dsc_label_write.restype = ctypes.c_int
    return lib


def covers(q, k, v, data, scale, zero, bits: int, valid, bias) -> bool:
    """Whether :func:`ds_decode` takes this call: a decode step (one query position) over rows valid on a prefix,
    no bias, K/V and 16-bit labels in fp32/bf16/fp16, unit stride along the last dims."""
    return (valid is None and bias is None and q.shape[2] == 1 and k.dtype == v.dtype and k.dtype in DTYPE_KIND
            and (bits != 16 or data.dtype in DTYPE_KIND) and k.stride(-1) == 1 and v.stride(-1) == 1
            and data.stride(-1) == 1 and (bits == 16 or (scale.stride(-1) == 1 and scale.stride() == zero.stride()))
            and q.device.type == "cpu" and library() is not None)


def _ptr(t: torch.Tensor | None):
    return None if t is None or t.numel() == 0 else t.data_ptr()


class Decode:
    """The native kernel's arguments for one set of K/V and label buffers, packed once (a step's plan, FlashInfer's
    plan/run split): :meth:`run` sets the query, the length, the output and the thread count and calls. Cold, the
    per-call Python is most of a short call's cost (DESIGN.md, "CPU decode step"), so a run does nothing else.
    The caller keeps ``k``, ``v`` and the labels alive and in place while it runs them (their contents may change):
    their addresses are packed, the tensors not held (a plan kept past its cache must not keep the cache)."""

    def __init__(self, q, k, v, channels, data, scale, zero, bits: int, lengths, budget: int, frac: float, sink: int,
                 recent: int, group: bool, sm_scale: float):
        b, hq, _, d = q.shape
        hkv, dv = k.shape[1], v.shape[-1]
        quantized = bits != 16
        channels = channels.contiguous()
        ln = None if lengths is None else lengths.to(torch.int64).contiguous()
        self.made = (channels, ln)  # made here: held
        self.args = [
            0, 0, 0, k.data_ptr(), v.data_ptr(), DTYPE_KIND[k.dtype], k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), channels.data_ptr(), data.data_ptr(),
            CODE_KIND[bits] if quantized else DTYPE_KIND[data.dtype], data.stride(0), data.stride(1), data.stride(2),
            _ptr(scale), _ptr(zero), scale.stride(0) if quantized else 0, scale.stride(1) if quantized else 0,
            _ptr(ln), b, hkv, hq // hkv, 0, d, dv, channels.shape[1], 0, budget, float(frac), sink, recent,
            int(group), float(sm_scale), 0, 1, -1]  # zeros: set per run
        self.out_shape, self.dtype = (b, hq, 1, dv), q.dtype
        self.call = library().dsc_ds_decode

    def run(self, q, s: int, kk: int, check_row: int = -1) -> torch.Tensor | None:
        """Decode ``q`` (the planned shape and dtype) over the first ``s`` positions with ``kk`` slots per row (the
        op's width for ``s``). ``check_row >= 0``: first check that the stored labels of that row are still those
        of ``k``'s row (bit for bit, every batch row and KV head); None, without decoding, when they are not (or a
        non-finite quantized label makes it undecidable)."""
        if q.dtype != torch.float32 or q.stride(-1) != 1:
            q = q.float().contiguous()
        out = torch.empty(self.out_shape)
        if self.call(*self.arguments(q, s, kk, out, torch.get_num_threads(), check_row)) != 0:
            return None
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def arguments(self, q, s: int, kk: int, out, threads: int, check_row: int) -> list:
        """``dsc_ds_decode``'s arguments for a run: the packed ones with the run's slots set (``q``: fp32, unit
        stride along D; ``out``: fp32 ``[B, Hq, 1, Dv]``, contiguous)."""
        a = self.args.copy()  # runs may overlap (threads)
        # the slots of dsc_ds_decode's signature: q and its strides; S, kk, out, nthreads, check_row
        a[0], a[1], a[2] = q.data_ptr(), q.stride(0), q.stride(1)
        a[26], a[30], a[37], a[38], a[39] = s, kk, out.data_ptr(), threads, check_row
        return a


def ds_decode(q, k, v, channels, data, scale, zero, bits: int, lengths, budget: int, frac: float, sink: int,
              recent: int, group: bool, sm_scale: float, kk: int, check_row: int = -1) -> torch.Tensor | None:
    """``dsc::ds_decode`` for a call :func:`covers` accepts (``kk``: the op's slots per row), packed and run once
    (:meth:`Decode.run`, which says what ``check_row`` does)."""
    return Decode(q, k, v, channels, data, scale, zero, bits, lengths, budget, frac, sink, recent, group,
                  sm_scale).run(q, k.shape[2], kk, check_row)


def writes(keys, positions, data, scale, zero, bits: int) -> bool:
    """Whether :func:`label_write` takes this call (see there)."""
    quantized = bits != 16
    return (keys.device.type == "cpu" and positions.dim() == 1 and keys.dtype in DTYPE_KIND
            and keys.stride(-1) == 1 and data.stride(-1) == 1
            and (quantized or data.dtype in (keys.dtype, torch.float32))
            and (not quantized or (scale.stride(-1) == 1 and scale.stride() == zero.stride()))
            and library() is not None)


def label_write(keys, channels, positions, data, scale, zero, bits: int) -> bool:
    """``dsc::label_write`` for validated arguments, natively, when it can: CPU tensors, positions ``[T]`` shared by
    the batch, unit stride along the last dims, 16-bit labels of the keys' dtype or fp32. Returns whether it wrote
    them: False leaves the call to the torch path (other layouts; a quantized label with a non-finite value, whose
    codes only the torch path defines)."""
    if not writes(keys, positions, data, scale, zero, bits):
        return False
    quantized = bits != 16
    b, hkv, t, _ = keys.shape
    if t == 0:
        return True
    channels, positions = channels.contiguous(), positions.contiguous()
    code = library().dsc_label_write(
        keys.data_ptr(), DTYPE_KIND[keys.dtype], keys.stride(0), keys.stride(1), keys.stride(2), channels.data_ptr(),
        positions.data_ptr(), data.data_ptr(), CODE_KIND[bits] if quantized else DTYPE_KIND[data.dtype],
        data.stride(0), data.stride(1), data.stride(2), _ptr(scale), _ptr(zero), scale.stride(0) if quantized else 0,
        scale.stride(1) if quantized else 0, b, hkv, t, channels.shape[1], bits)
    return code == 0
