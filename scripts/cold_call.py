"""What a native decode call costs beyond its kernel when everything starts cold: each piece of
``DecodePlan.run`` timed alone after a cache flush of twice the last-level cache (as ``dsc bench attention`` flushes
before each call), pieces alternating, median of the repeats. The per-call Python, ctypes and allocation are what
decide the short cells (batch 1, 16K) of the op table, where the kernel itself takes about half a millisecond.

    .venv/bin/python scripts/cold_call.py 9x3x64 1 16384 8      # shape, batch, length, label bits [repeats]

Pieces: ``plan.run`` (what the bench's "plan ms" times), ``Decode.run`` (the kernel's packed call: output
allocated, arguments set, called), the bare ctypes call with its arguments built beforehand, the same call over 16
positions (the call's fixed cost: ctypes and the kernel's setup), and alone: the output's ``torch.empty``,
``Decode.arguments``, ``checks.topk_width``, a Python call that does nothing.
"""
import os
import statistics
import sys
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the dsc command: K/V on huge pages

import torch  # noqa: E402

from dsc.bench.common import cpu_flush_mb  # noqa: E402
from dsc.kernels import checks  # noqa: E402
from native_phases import planned_case  # noqa: E402  (this folder's: sys.path[0] when run as a script)


def main(shape: str, batch: int, length: int, bits: int, repeats: int = 30) -> None:
    torch.set_num_threads(1)
    q, plan, budget = planned_case(shape, batch, length, bits)
    if plan.native is None:
        sys.exit("the native kernel does not take this call here (no C++ compiler, or not a CPU)")
    call = plan.native
    kk = checks.topk_width(length, budget, 0.0)
    out = torch.empty(call.out_shape)
    args = call.arguments(q, length, kk, out, 1, -1)
    args16 = call.arguments(q, 16, checks.topk_width(16, budget, 0.0), out, 1, -1)
    pieces = {
        "DecodePlan.run": lambda: plan.run(q),
        "Decode.run": lambda: call.run(q, length, kk),
        "bare ctypes call": lambda: call.call(*args),
        "bare call, 16 positions": lambda: call.call(*args16),
        "torch.empty(out)": lambda: torch.empty(call.out_shape),
        "Decode.arguments": lambda: call.arguments(q, length, kk, out, 1, -1),
        "checks.topk_width": lambda: checks.topk_width(length, budget, 0.0),
        "no-op Python call": lambda: None,
    }
    flush_mb = cpu_flush_mb()
    junk = torch.empty(int(flush_mb * 2**18))
    times = {name: [] for name in pieces}
    for _ in range(repeats):
        for name, fn in pieces.items():
            junk.fill_(1.0)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"{shape}, batch {batch}, {length} positions, {bits}-bit labels, 1/16: ms per piece, cold "
          f"({flush_mb:g} MB flush before each), median of {repeats}")
    for name, ts in times.items():
        print(f"  {name:<24} {statistics.median(ts) * 1e3:.3f}")


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *map(int, sys.argv[5:]))
