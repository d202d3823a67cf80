"""What 2 MB pages buy a decode-attention call on this CPU: the Double Sparsity op and the best dense attention
(packed-GQA SDPA) over one set of K/V and labels on transparent huge pages and an identical set on 4 KB pages,
calls alternating between the two in one process, a cache flush of twice the last-level cache before each (a
machine whose memory speed drifts between runs moves both sets alike).

A copy is put on huge pages by advising its untouched memory (``madvise(MADV_HUGEPAGE)``) before writing it, on
4 KB pages by ``MADV_NOHUGEPAGE``; the kernel's THP mode must be ``madvise`` or ``always``. Linux only.

    .venv/bin/python scripts/huge_pages_ab.py 32x8x128 4 65536 8     # shape, batch, length, label bits [repeats]
"""
import ctypes
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import dsc.kernels  # noqa: F401  (registers torch.ops.dsc)
from dsc.bench.common import cpu_flush_mb
from dsc.kernels import alloc_labels

MADV_HUGEPAGE, MADV_NOHUGEPAGE, HUGE = 14, 15, 2 << 20
_libc = ctypes.CDLL(None)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def copy_on_pages(src: torch.Tensor, huge: bool) -> torch.Tensor:
    """A copy of ``src`` whose 2 MB-aligned interior is advised onto huge pages (or kept off them) before the
    copy first touches it."""
    room = torch.empty(src.numel() + HUGE // src.element_size(), dtype=src.dtype)  # fresh, untouched memory
    start = -room.data_ptr() % HUGE
    out = room[start // src.element_size():][:src.numel()]
    advised = src.numel() * src.element_size() // HUGE * HUGE
    if advised and _libc.madvise(out.data_ptr(), advised, MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE) != 0:
        raise OSError(ctypes.get_errno(), "madvise failed: is transparent_hugepage 'never'?")
    return out.view(src.shape).copy_(src)


def huge_mb() -> int:
    return int(open("/proc/self/smaps_rollup").read().split("AnonHugePages:")[1].split()[0]) // 1024


def main() -> None:
    hq, hkv, d = map(int, sys.argv[1].split("x"))
    b, s, bits = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    repeats = int(sys.argv[5]) if len(sys.argv) > 5 else 10
    torch.set_num_threads(1)
    r, budget, sm = d // 4, math.ceil(s / 16), d ** -0.5
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, 1, d, generator=gen)
    k, v = torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    channels = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(hkv)])
    labels = alloc_labels(b, hkv, s, r, bits, torch.float32, "cpu")
    torch.ops.dsc.label_write(k, channels, torch.arange(s), *labels, bits)
    sets = {}
    for huge in (True, False):
        before = huge_mb()
        sets[huge] = (copy_on_pages(k, huge), copy_on_pages(v, huge),
                      tuple(copy_on_pages(t, huge) if t.numel() else t for t in labels))
        print(f"{'huge' if huge else '4 KB'} pages: {huge_mb() - before} MB of the copies on 2 MB pages")
    packed_q = q.reshape(b, hkv, hq // hkv, d)
    calls = {
        "DS": lambda kk, vv, lab: torch.ops.dsc.ds_decode(q, kk, vv, channels, *lab, bits, None, None, None, budget,
                                                          0.0, 0, 0, True, sm),
        "dense": lambda kk, vv, lab: F.scaled_dot_product_attention(packed_q, kk, vv, scale=sm),
    }
    if not torch.equal(calls["DS"](*sets[True]), calls["DS"](*sets[False])):
        raise SystemExit("the two copies gave different outputs")
    junk = torch.empty(int(cpu_flush_mb() * 2**18))
    times = {(name, huge): [] for name in calls for huge in sets}
    for i in range(repeats + 2):
        for name, fn in calls.items():
            for huge in ((True, False) if i % 2 else (False, True)):
                junk.fill_(1.0)
                t0 = time.process_time()
                fn(*sets[huge])
                if i >= 2:  # two warm-up rounds
                    times[(name, huge)].append(time.process_time() - t0)
    ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    print(f"{sys.argv[1]} B{b} S{s} {bits}-bit labels, 1/16, median of {repeats}, CPU ms:")
    for name in calls:
        print(f"  {name:5s} huge {ms[(name, True)]:8.3f}  4 KB {ms[(name, False)]:8.3f}  "
              f"({ms[(name, False)] / ms[(name, True)]:.2f}x)")
    print(f"  dense / DS: huge {ms[('dense', True)] / ms[('DS', True)]:.2f}x, "
          f"4 KB {ms[('dense', False)] / ms[('DS', False)]:.2f}x")


if __name__ == "__main__":
    main()
