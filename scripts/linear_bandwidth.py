"""How fast this CPU reads a decoder's Linear weights at decode: every Linear of a model (its weights, one thread,
distinct tensors so that they stream from memory as in a decode step) applied to M rows, in GB/s of weights, beside
a plain sum over the same bytes. At batch 4 an end-to-end step of the embedded model is mostly these GEMMs (README,
"Where an end-to-end step goes"), which the dense model and dsparse pay alike.

    .venv/bin/python scripts/linear_bandwidth.py [--rows 1,4] [--repeats 5]

Ways: ``F.linear`` (what the HF model calls: MKL's sgemm), and MKL / oneDNN with the weights packed beforehand
(``torch.ops.mkl._mkl_linear``, ``torch.ops.mkldnn._linear_pointwise``: what inductor's ``freezing`` uses on CPU),
each where this torch build has it.
"""
import argparse
import time

import torch
import torch.nn.functional as F


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def ways(weights, m: int) -> dict:
    """name -> a function applying every weight to its own [m, in] input."""
    inputs = [torch.randn(m, w.shape[1]) for w in weights]
    found = {"F.linear": lambda: [F.linear(x, w) for x, w in zip(inputs, weights)]}
    if torch._C.has_mkl:
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in weights]
        found["MKL, packed"] = lambda: [torch.ops.mkl._mkl_linear(x, p, w, None, m)
                                        for x, p, w in zip(inputs, packed, weights)]
    if torch.backends.mkldnn.is_available():
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w, m) for w in weights]
        found["oneDNN, packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                           for x, p in zip(inputs, onednn)]
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,4", help="rows per GEMM (the decode batch), e.g. 1,4")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    from dsc.assets import load_model

    model, _ = load_model(None)
    weights = [mod.weight.detach().contiguous() for mod in model.model.layers.modules()
               if isinstance(mod, torch.nn.Linear)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    print(f"{len(weights)} Linear weights of the embedded model's layers, {nbytes / 2**20:.0f} MB, one thread, "
          f"best of {args.repeats}")
    flat = torch.ones(nbytes // 4)
    s = best_seconds(flat.sum, args.repeats)
    print(f"  sum over as many bytes: {s * 1e3:.1f} ms, {nbytes / s / 1e9:.2f} GB/s")
    with torch.no_grad():
        for m in (int(x) for x in args.rows.split(",")):
            for name, fn in ways(weights, m).items():
                s = best_seconds(fn, args.repeats)
                print(f"  M = {m}, {name}: {s * 1e3:.1f} ms, {nbytes / s / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
