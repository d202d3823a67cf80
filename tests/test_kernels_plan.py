"""``DecodePlan`` (``dsc/kernels/plan.py``): a plan over fixed K/V and label buffers, run per step, against the
definition (``assert_ds_decode_matches_oracle``: reference scores -> reference top-k -> exact attention over the
buffers' first ``length`` positions), on the native kernel and on the op; and what it refuses."""
from dataclasses import replace
from unittest import mock

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import dsc.kernels  # noqa: F401  (registers torch.ops.dsc)
from dsc.kernels import native
from dsc.kernels import reference as R
from dsc.kernels.plan import DecodePlan
from dsc.kernels.testing import assert_ds_decode_matches_oracle, make_case
from kernel_helpers import ONCE, TOL, count_checks


def prefix(c, n):
    """Case ``c`` cut to its first ``n`` positions: what a run over ``length=n`` must compute."""
    quantized = c.bits != 16  # scale/zero per position; 16-bit labels have none
    return replace(c, k=c.k[:, :, :n], v=c.v[:, :, :n], data=c.data[:, :, :n],
                   scale=c.scale[:, :, :n] if quantized else c.scale, zero=c.zero[:, :, :n] if quantized else c.zero)


def plan_of(c, sel):
    return DecodePlan(c.q, c.k, c.v, *c.labels, **sel)


# explicit examples: every label format, fp32 and a 16-bit dtype, group and per-head selection, the whole buffer,
# a prefix, an empty one; a fractional budget with sink/recent, and the native kernel's absence (the op runs)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([16, 8, 4]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), group=st.booleans(), s=st.integers(1, 300),
       cut=st.floats(0.0, 1.0), budget=st.integers(1, 40), frac=st.sampled_from([0.0, 1 / 16]),
       sink=st.integers(0, 4), recent=st.integers(0, 8), use_native=st.booleans())
@example(seed=1, bits=16, dtype=torch.float32, group=True, s=200, cut=1.0, budget=8, frac=1 / 16, sink=4, recent=8,
         use_native=True)
@example(seed=2, bits=8, dtype=torch.float32, group=False, s=250, cut=0.5, budget=12, frac=0.0, sink=1, recent=2,
         use_native=True)
@example(seed=3, bits=4, dtype=torch.bfloat16, group=True, s=131, cut=0.8, budget=5, frac=1 / 16, sink=0, recent=3,
         use_native=True)
@example(seed=4, bits=8, dtype=torch.bfloat16, group=True, s=90, cut=0.0, budget=4, frac=0.0, sink=2, recent=2,
         use_native=True)
@example(seed=5, bits=4, dtype=torch.float32, group=False, s=150, cut=0.6, budget=9, frac=1 / 16, sink=1, recent=4,
         use_native=False)
@example(seed=6, bits=16, dtype=torch.bfloat16, group=True, s=77, cut=1.0, budget=6, frac=0.0, sink=0, recent=0,
         use_native=False)
def test_plan_runs_match_definition(seed, bits, dtype, group, s, cut, budget, frac, sink, recent, use_native):
    c = make_case(seed, 2, 2, 3, 1, s, 64, 16, bits, dtype)
    sel = dict(budget=budget, frac=frac, sink=sink, recent=recent, group=group)
    with mock.patch.object(native, "covers", native.covers if use_native else lambda *a: False):
        plan = plan_of(c, sel)
    assert (plan.native is not None) == (use_native and native.library() is not None)
    n = round(cut * s)
    out = plan.run(c.q, length=n)
    if n == 0:  # nothing to attend: zeros by the op's contract
        assert torch.equal(out, torch.zeros_like(c.q))
    else:
        assert_ds_decode_matches_oracle(out, prefix(c, n), budget, frac, sink, recent, group, None, TOL[dtype])
    if n == s:
        assert torch.equal(plan.run(c.q), out)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_plan_reads_what_was_written_after_planning(bits):
    """A static cache filling up: rows and labels written into the planned buffers after planning (and a new
    query) are what the next run attends over."""
    c = make_case(7, 1, 3, 3, 1, 120, 64, 16, bits)
    plan = plan_of(c, dict(budget=6, frac=1 / 16, sink=1, recent=2))
    gen = torch.Generator().manual_seed(8)
    for n in (100, 101, 120):
        rows = slice(n - 1, n)
        c.k[:, :, rows] = torch.randn(1, 3, 1, 64, generator=gen)
        c.v[:, :, rows] = torch.randn(1, 3, 1, 64, generator=gen)
        R.label_write(c.k[:, :, rows], c.channels, torch.tensor([n - 1]), c.data, c.scale, c.zero, bits)
        c.q.copy_(torch.randn(c.q.shape, generator=gen))
        out = plan.run(c.q, length=n)
        assert_ds_decode_matches_oracle(out, prefix(c, n), 6, 1 / 16, 1, 2, True, None, TOL[torch.float32])


def test_plan_checks_once_and_runs_without_checks(monkeypatch):
    c = make_case(9, 2, 2, 2, 1, 64, 32, 8, 8)
    calls = count_checks(monkeypatch)
    plan = plan_of(c, dict(budget=8))
    for _ in range(3):
        plan.run(c.q)
    assert calls == ONCE


def test_plan_refuses_bad_arguments_when_planning_and_other_queries_when_running():
    c = make_case(10, 2, 2, 2, 1, 64, 32, 8, 16)
    with pytest.raises(ValueError, match="channels"):
        DecodePlan(c.q, c.k, c.v, c.channels[:1], c.data, c.scale, c.zero, 16)
    with pytest.raises(ValueError, match="budget"):
        DecodePlan(c.q, c.k, c.v, *c.labels, budget=0)
    plan = plan_of(c, dict(budget=8))
    for q in (c.q[:1], c.q.bfloat16(), c.q.expand(2, 4, 1, 32)[:, :, :, :16]):
        with pytest.raises(ValueError, match="q: .* is not the planned query"):
            plan.run(q)
    for n in (-1, 65, 3.0):
        with pytest.raises(ValueError, match=r"length: must be an int in \[0, 64\]"):
            plan.run(c.q, length=n)
    with mock.patch.object(native, "covers", lambda *a: False):
        on_op = plan_of(c, dict(budget=8))
    with pytest.raises(ValueError, match="check_row"):
        on_op.run(c.q, check_row=3)


def test_plan_query_may_be_a_strided_view():
    """A run takes any query of the planned shape and dtype, e.g. a slice of a wider projection output."""
    c = make_case(11, 2, 2, 3, 1, 80, 64, 16, 8)
    plan = plan_of(c, dict(budget=10, recent=2))
    q = torch.zeros(2, 6, 1, 128)[..., 32:96]
    q.copy_(c.q)
    assert q.stride(1) == 128
    assert torch.equal(plan.run(q), plan.run(c.q))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plan_on_cuda_runs_the_op():
    """On a GPU a plan has no native call: a run is the op (Triton) over the buffers' first ``length`` positions."""
    c = make_case(12, 2, 2, 4, 1, 300, 64, 16, 8, torch.bfloat16)
    g = replace(c, q=c.q.cuda(), k=c.k.cuda(), v=c.v.cuda(), channels=c.channels.cuda(), data=c.data.cuda(),
                scale=c.scale.cuda(), zero=c.zero.cuda())
    plan = plan_of(g, dict(budget=12, frac=1 / 16, sink=2, recent=4))
    assert plan.native is None
    out = plan.run(g.q, length=250)
    assert out.is_cuda
    assert_ds_decode_matches_oracle(out.cpu(), prefix(c, 250), 12, 1 / 16, 2, 4, True, None, TOL[torch.bfloat16])
