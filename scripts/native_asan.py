"""Memory-safety sweep of the native CPU decode kernel under AddressSanitizer (a check to run by hand after changing
``dsc/kernels/csrc/ds_decode_cpu.cpp``; pytest cannot host it: ASan aborts on the C++ exceptions torch throws).

It builds the kernel with ``-fsanitize=address -D_GLIBCXX_SANITIZE_VECTOR`` (scratch vectors checked to their size,
not their capacity) and calls it over every label format, K/V dtype, selection mode, budget kind (absolute,
fractional with sink/recent, covering the row), ``lengths``, row lengths on and off the 8-token blocks and 3, 4 or 6
query heads per KV head, with the continuity check of the last row, and as a ``DecodePlan`` run over the first half
of its buffers; and the label write over every label format, key dtype, odd and even ``r``, one and several tokens,
contiguous and transposed keys::

    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 .venv/bin/python scripts/native_asan.py

Prints ``clean: N calls`` or ASan's report of the first bad access (and exits non-zero).
"""
import itertools
import subprocess
import tempfile
from pathlib import Path

import torch

from dsc.kernels import DecodePlan, alloc_labels, checks, native
from dsc.kernels.testing import make_case

FLAGS = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-D_GLIBCXX_SANITIZE_VECTOR",
         "-march=native", "-std=c++17", "-fPIC", "-shared", "-fopenmp"]
BUDGETS = [(1, 0.0, 0, 0), (5, 0.0, 0, 0), (50, 0.0, 0, 0), (97, 0.0, 0, 0), (150, 0.0, 0, 0), (4, 1 / 16, 4, 16),
           (2, 0.5, 1, 3), (30, 0.25, 0, 40)]
SHAPES = [(100, 16, 4), (37, 64, 16), (300, 128, 32), (9, 16, 5)]  # (S, D, r)
LONG_BUDGETS = [(4, 1 / 16, 4, 16), (3000, 0.0, 0, 0), (30, 0.25, 0, 40)]  # rows selected from a sample's candidates


def main() -> None:
    lib = Path(tempfile.mkdtemp()) / "ds_decode_asan.so"
    subprocess.run([native._compiler() or "c++", *FLAGS, str(native.SOURCE), "-o", str(lib)], check=True)
    native._build = lambda cxx: lib
    native.library.cache_clear()
    calls = 0
    for threads, seed, bits, dtype, lengths, group, (budget, frac, sink, recent), (s, d, r) in itertools.product(
            (1, 3), range(3), (16, 8, 4), (torch.float32, torch.bfloat16, torch.float16), (False, True), (True, False),
            BUDGETS, SHAPES):
        torch.set_num_threads(threads)  # 3: fewer than two tasks per thread, so the tasks are split into pieces
        group_size = (3, 4, 6)[seed]  # one or two blocks of 4 heads in the scoring
        c = make_case(seed, 2, 2, group_size, 1, s, d, r, bits, dtype, "none", False, lengths)
        out = native.ds_decode(c.q, c.k, c.v, c.channels, c.data, c.scale, c.zero, bits, c.lengths, budget, frac,
                               sink, recent, group, d ** -0.5, checks.topk_width(s, budget, frac), s - 1)
        assert out is not None, "the last row's labels, written by the reference, failed the kernel's check"
        if not lengths:  # a plan over the buffers, run over their first half (DecodePlan.run's length)
            DecodePlan(c.q, c.k, c.v, c.channels, c.data, c.scale, c.zero, bits, budget, frac, sink, recent,
                       group).run(c.q, length=s // 2)
            calls += 1
        calls += 1
    for threads, bits, lengths, group, (budget, frac, sink, recent) in itertools.product(
            (1, 3), (16, 8, 4), (False, True), (True, False), LONG_BUDGETS):
        torch.set_num_threads(threads)
        c = make_case(bits, 2, 2, 3, 1, 8200, 64, 16, bits, torch.float32, "none", False, lengths)
        native.ds_decode(c.q, c.k, c.v, c.channels, c.data, c.scale, c.zero, bits, c.lengths, budget, frac, sink,
                         recent, group, 0.125, checks.topk_width(8200, budget, frac))
        calls += 1
    for seed, bits, dtype, (s, d, r), t, transposed in itertools.product(
            range(2), (16, 8, 4), (torch.float32, torch.bfloat16, torch.float16), SHAPES, (1, 7), (False, True)):
        gen = torch.Generator().manual_seed(seed)
        keys = torch.randn(2, t, 3, d, generator=gen).to(dtype).transpose(1, 2)
        keys = keys if transposed else keys.contiguous()
        channels = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(3)])
        labels = alloc_labels(2, 3, s, r, bits, dtype=torch.float32 if seed else dtype)
        positions = torch.randperm(s, generator=gen)[:t] if t <= s else torch.arange(s)
        assert native.label_write(keys[:, :, :positions.numel()], channels, positions, *labels, bits)
        calls += 1
    print(f"clean: {calls} calls")


if __name__ == "__main__":
    main()
