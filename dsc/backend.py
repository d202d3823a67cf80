"""The ``dsparse`` torch.compile backend (registered under the ``torch_dynamo_backends`` entry point).

STATUS: day-one placeholder. It compiles the graph through inductor UNCHANGED; it does not sparsify anything yet.
The SDPA -> Double Sparsity rewrite lands with the backend issue.
"""
from __future__ import annotations


def dsparse(gm, example_inputs, mode=None, options=None):
    """Compile ``gm`` with inductor, unchanged (placeholder: no Double Sparsity rewrite yet)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
