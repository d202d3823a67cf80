"""Shared benchmark plumbing: machine facts, list parsing, table and JSON output."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def parse_list(text: str, kind=int, name: str = "value") -> list:
    """``"512,2K,8k"`` -> ``[512, 2048, 8192]`` (``K`` = 1024); floats and fractions like ``1/16`` for ``kind=float``."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if kind is int:
                mult = 1024 if part[-1] in "kK" else 1
                out.append(int(part[:-1] if mult > 1 else part) * mult)
            elif kind is float and "/" in part:
                num, den = part.split("/")
                out.append(float(num) / float(den))
            else:
                out.append(kind(part))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"cannot read {part!r} as a {name} (expected a comma-separated list)") from None
    if not out:
        raise ValueError(f"empty {name} list")
    return out


def parse_shapes(text: str, name: str = "--shape") -> list[tuple[int, int, int]]:
    """``"32x8x128,9x3x64"`` -> ``[(Hq, Hkv, D), ...]``, checked (Hq a multiple of Hkv)."""
    out = []
    for part in text.split(","):
        try:
            hq, hkv, d = (int(x) for x in part.lower().strip().split("x"))
        except ValueError:
            raise ValueError(f"{name}: cannot read {part!r}; expected HqxHkvxD, e.g. 32x8x128") from None
        if hkv < 1 or hq % hkv or d < 1:
            raise ValueError(f"{name}: {part!r} needs Hq a multiple of Hkv and D >= 1")
        out.append((hq, hkv, d))
    return out


def median_timer(device, clock: str = "wall", flush_mb: float = 0.0):
    """``run(fn, repeats, warmup) -> median ms``; the device is synchronised around each call, and ``flush_mb``
    of memory is written before each so inputs start cold."""
    import statistics
    import time

    import torch

    junk = torch.empty(int(flush_mb * 2**18), dtype=torch.float32, device=device) if flush_mb > 0 else None
    now = time.process_time if clock == "cpu" else time.perf_counter

    def run(fn, repeats: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if junk is not None:
                junk.fill_(1.0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = now()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(now() - t0)
        return statistics.median(times) * 1e3

    return run


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    return info


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Plain aligned text table; ``columns`` are ``(key, header)`` pairs."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[h for _, h in columns]] + [[cell(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
