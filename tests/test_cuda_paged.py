"""On a CUDA GPU (skipped elsewhere): the compiled paged sparse-attention kernel, through
``dsc::paged_sparse_attention``, against the plain-torch reference on CPU; same cases as ``test_paged_attention.py`` (NaN in rows no request holds).

Run with the interpreter off: ``TRITON_INTERPRET=0 pytest tests/test_cuda_paged.py``.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings

import dsc.kernels  # noqa: F401  (registers torch.ops.dsc)
from dsc.kernels import paged as P
from kernel_helpers import TOL
from paged_helpers import DTYPES, make_paged, params, with_examples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU and TRITON_INTERPRET=0")


@settings(max_examples=30)
@given(params(max_len=300))
@with_examples
def test_compiled_paged_kernel_matches_reference(p):
    c = make_paged(p, garbage="nan", pad="minus1")
    want = P.reference(*c.args, 0.125)
    got = torch.ops.dsc.paged_sparse_attention(*(t.cuda() for t in c.args), 0.125)
    torch.cuda.synchronize()
    tol = TOL[DTYPES[p["dtype"]]]
    assert got.is_cuda and got.dtype == c.q.dtype and torch.isfinite(got).all()
    assert torch.allclose(got.cpu().float(), want.float(), atol=tol, rtol=tol)


def test_compiled_paged_kernel_under_cuda_graph():
    """Fixed shapes, no host sync: the op captures into a CUDA graph and replays with new lengths and slots."""
    c = make_paged(dict(seed=3, page=16, hkv=2, g=4, d=128, lq=1, lengths=[200, 77, 130], extra_pages=1,
                        slots=64, per_head=False, dtype="bf16", share=True, bt32=True, len32=True))
    args = [t.cuda() for t in c.args]
    op = torch.ops.dsc.paged_sparse_attention
    op(*args, 0.1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(*args, 0.1)
    args[4].copy_(torch.tensor([150, 77, 20], dtype=args[4].dtype))
    args[5].copy_(torch.flip(args[5], (-1,)))
    graph.replay()
    torch.cuda.synchronize()
    want = P.reference(*(t.cpu() for t in args), 0.1)
    assert torch.allclose(out.cpu().float(), want.float(), atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])
