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


def last_level_cache_mb(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> float | None:
    """The largest CPU cache's size in MB (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for f in caches.glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(text[-1:], None)
        if scale is not None and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * scale)
    return max(sizes) if sizes else None


def cpu_flush_mb() -> float:
    """What to write before each timed CPU call so its inputs start cold, as after a real decode step's other
    layers: twice the last-level cache (a 260 MB L3 keeps 100 MB of labels and rows warm through a 64 MB
    flush), at least 64 MB."""
    llc = last_level_cache_mb()
    return max(64.0, 2 * llc) if llc else 64.0


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


def huge_pages() -> str:
    """Whether large CPU tensors sit on transparent huge pages: the kernel's THP mode (``always``: every large
    allocation; ``madvise``: those PyTorch advises, with ``THP_MEM_ALLOC_ENABLE=1``, which the ``dsc`` command sets
    unless it is set)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        mode = text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        mode = "unavailable"
    from dsc.cli import HUGE_PAGES_ENV

    env = os.environ.get(HUGE_PAGES_ENV, "unset")
    on = mode == "always" or (mode == "madvise" and env not in ("0", "", "unset"))
    return f"{'on' if on else 'off'} ({HUGE_PAGES_ENV}={env}, kernel THP {mode})"


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
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "huge_pages": huge_pages(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    return info


def cpu_busy_seconds() -> float | None:
    """CPU seconds all processes on the machine have spent busy since boot (user, nice, system, irq, softirq of
    Linux ``/proc/stat``), or None where that file is missing. The difference over a run, less the run's own
    ``time.process_time()``, is what other work took from the cores meanwhile."""
    try:
        user, nice, system, _idle, _iowait, irq, softirq = (
            int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


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


def check_plot_path(path: str | None, flag: str = "--plot"):
    """Fail before a long run, not after it: matplotlib must import and the folder of ``path`` must exist.
    Returns ``matplotlib.pyplot`` (Agg backend), or None when there is no ``path``."""
    if not path:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(f"{flag} needs matplotlib (the `plot` extra); install it with: .venv/bin/pip install -c "
                         "constraints.txt matplotlib   (or pip install 'dsc[plot]')") from None
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {path}: the folder {folder} does not exist")
    return plt


def _context_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_ms_per_step(path: str, rows: list[dict], keys: tuple[str, ...], title: str = "") -> list[str]:
    """Draw ms/step (``row["ms_per_step"]``) against context (``row["context"]``) to ``path``: one line per distinct
    combination of the ``keys`` values among ``rows``. A line's label gives the values of the keys that vary between
    lines (numbers and ``quant`` as ``key value``, e.g. ``dense eager batch 4``); the keys that do not vary go into
    the title. Returns the line labels in order."""
    plt = check_plot_path(path)
    varying = [k for k in keys if len({r.get(k) for r in rows}) > 1]
    fixed = [k for k in keys if k not in varying]

    def describe(row, names, named=False):
        return " ".join(f"{k} {row.get(k)}" if named or k == "quant" or not isinstance(row.get(k), str)
                        else row.get(k) for k in names)

    lines: dict[tuple, list] = {}
    for r in rows:
        lines.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    labels = []
    for group in lines.values():
        group = sorted(group, key=lambda r: r["context"])
        label = describe(group[0], varying) or describe(group[0], fixed) or "ms/step"
        ax.plot([r["context"] for r in group], [r["ms_per_step"] for r in group], marker="o", label=label)
        labels.append(label)
    contexts = sorted({r["context"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [_context_label(c) for c in contexts])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context (tokens in the cache)")
    ax.set_ylabel("ms per decode step (median)")
    if rows and fixed:
        title = "; ".join(t for t in (title, ", ".join(describe(rows[0], [k], True) for k in fixed)) if t)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return labels
