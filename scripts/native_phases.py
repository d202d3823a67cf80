"""Where a native decode call's time goes: label scoring, selection and attention, in TSC cycles per (batch, KV
head) task, for one or more versions of the kernel's source timed against each other.

Each source is built with ``-DDSC_PHASES`` (the kernel then times its phases with the TSC; one thread, whole
tasks) and called with the arguments ``DecodePlan`` packs (group selection, 1/16 of the row, no sink/recent, r =
D/4, fp32 K/V), calls alternating between the builds, each after a 1 GB write so that its inputs start cold. Prints
each build's median cycles per task; the output of every call is checked against the installed kernel's.

    .venv/bin/python scripts/native_phases.py 9x3x64 4 65536 8 21 dsc/kernels/csrc/ds_decode_cpu.cpp /tmp/old.cpp
    # shape batch length bits calls sources...
"""
import ctypes
import math
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the dsc command: K/V on huge pages

import torch  # noqa: E402

from dsc.kernels import alloc_labels, native  # noqa: E402
from dsc.kernels.checks import topk_width  # noqa: E402
from dsc.kernels.plan import DecodePlan  # noqa: E402

PHASES = ("score", "select", "attend")


def build(source: str, out_dir: str) -> ctypes.CDLL:
    so = os.path.join(out_dir, f"{len(os.listdir(out_dir))}.so")
    subprocess.check_call(["c++", *native.FLAGS, "-DDSC_PHASES", source, "-o", so])
    return native.load(so)


def planned_case(shape: str, batch: int, length: int, bits: int) -> tuple[torch.Tensor, DecodePlan, int]:
    """``(q, plan, budget)``: the measuring scripts' call (``scripts/cold_call.py`` too): random fp32 K/V of
    ``shape`` (HqxHkvxD), labelled with r = D/4 random channels in ``bits``-bit labels, planned with group
    selection over 1/16 of the row, no sink/recent."""
    hq, hkv, d = map(int, shape.split("x"))
    r = d // 4
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hq, 1, d, generator=gen)
    k = torch.randn(batch, hkv, length, d, generator=gen)
    v = torch.randn(batch, hkv, length, d, generator=gen)
    channels = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(hkv)])
    labels = alloc_labels(batch, hkv, length, r, bits, torch.float32, q.device)
    torch.ops.dsc.label_write(k, channels, torch.arange(length), *labels, bits)
    budget = math.ceil(length / 16)
    return q, DecodePlan(q, k, v, channels, *labels, bits, budget=budget, sm_scale=d ** -0.5), budget


def main(shape: str, batch: int, length: int, bits: int, calls: int, sources: list[str]) -> None:
    torch.set_num_threads(1)
    q, plan, budget = planned_case(shape, batch, length, bits)
    hkv = int(shape.split("x")[1])
    want = plan.run(q)
    out = torch.empty_like(want)
    args = plan.native.arguments(q, length, topk_width(length, budget, 0.0), out, 1, -1)
    junk = torch.empty(2**28)  # 1 GB
    cycles = (ctypes.c_uint64 * 4)()
    with tempfile.TemporaryDirectory() as tmp:
        libs = [build(s, tmp) for s in sources]
        runs = [[] for _ in libs]
        for _ in range(calls):
            for lib, run in zip(libs, runs):
                junk.fill_(1.0)
                out.zero_()
                lib.dsc_phase_reset()
                lib.dsc_ds_decode(*args)
                lib.dsc_phase_read(cycles)
                run.append(list(cycles))
                torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    tasks = batch * hkv
    print(f"{shape}, batch {batch}, {length} positions, {bits}-bit labels: M TSC cycles per task, median of {calls}")
    for source, run in zip(sources, runs):
        med = [sorted(c[i] for c in run)[len(run) // 2] / tasks / 1e6 for i in range(4)]
        print(f"  {source}: " + ", ".join(f"{p} {m:.3f}" for p, m in zip(PHASES, med)) + f", total {med[3]:.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 7:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])
