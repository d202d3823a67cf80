"""The native CPU decode kernel (``dsc/kernels/native.py``, ``csrc/ds_decode_cpu.cpp``) against the definition:
reference label scores -> reference top-k -> exact attention (``assert_ds_decode_matches_oracle``), on every
call shape it takes (one query position, no mask, no bias), and the torch path for the rest."""
import contextlib
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import dsc.kernels  # noqa: F401  (registers torch.ops.dsc)
from dsc.kernels import cpu as C
from dsc.kernels import native
from dsc.kernels import reference as R
from dsc.kernels.testing import assert_ds_decode_matches_oracle, make_case
from kernel_helpers import TOL

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C++ compiler: the native kernel is not built")


@contextlib.contextmanager
def native_calls():
    """The list of ``ds_decode`` calls that took the native kernel (so a test cannot pass on the torch path
    unnoticed), while the block runs."""
    calls = []
    real = native.ds_decode

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with mock.patch.object(native, "ds_decode", spy):
        yield calls


# explicit examples: every label format x dtype, group and head selection, r on the vector paths (16, 32: 8-bit
# codes with both and 4-bit with 32 take 16-token blocks on AVX-512) and off them (odd, 8-bit with r = 5), 1, 3, 4
# and 6 query heads per KV head (none, one or two blocks of 4 heads in the scoring), lengths, cache lengths with a
# tail (not a multiple of 8), fractional budgets with sink/recent, a budget covering the row, forced tokens filling
# it
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([16, 8, 4]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), group=st.booleans(),
       g=st.sampled_from([1, 3, 4, 6]), d=st.sampled_from([64, 128, 80]), r=st.sampled_from([16, 32, 5, 1]),
       s=st.integers(1, 700), lengths=st.booleans(), budget=st.integers(1, 80),
       frac=st.sampled_from([0.0, 1 / 16, 0.3]), sink=st.integers(0, 4), recent=st.integers(0, 16))
@example(seed=1, bits=16, dtype=torch.float32, group=True, g=3, d=64, r=16, s=611, lengths=False, budget=36,
         frac=1 / 16, sink=4, recent=16)
@example(seed=2, bits=8, dtype=torch.float32, group=True, g=4, d=128, r=32, s=517, lengths=True, budget=36,
         frac=1 / 16, sink=4, recent=16)
@example(seed=3, bits=4, dtype=torch.float32, group=False, g=3, d=64, r=16, s=403, lengths=True, budget=24,
         frac=0.0, sink=2, recent=3)
@example(seed=4, bits=16, dtype=torch.bfloat16, group=True, g=4, d=128, r=32, s=299, lengths=False, budget=30,
         frac=0.3, sink=1, recent=1)
@example(seed=5, bits=8, dtype=torch.float16, group=False, g=1, d=80, r=5, s=77, lengths=False, budget=9,
         frac=0.0, sink=0, recent=0)
@example(seed=6, bits=4, dtype=torch.bfloat16, group=True, g=3, d=64, r=5, s=130, lengths=True, budget=12,
         frac=1 / 16, sink=3, recent=8)
@example(seed=7, bits=16, dtype=torch.float16, group=False, g=4, d=64, r=16, s=45, lengths=False, budget=80,
         frac=0.0, sink=2, recent=2)
@example(seed=8, bits=8, dtype=torch.bfloat16, group=True, g=1, d=128, r=1, s=8, lengths=True, budget=3,
         frac=0.0, sink=4, recent=16)
@example(seed=9, bits=16, dtype=torch.float16, group=True, g=6, d=64, r=16, s=203, lengths=True, budget=20,
         frac=1 / 16, sink=4, recent=16)
@example(seed=10, bits=4, dtype=torch.float32, group=False, g=6, d=128, r=32, s=91, lengths=False, budget=11,
         frac=0.0, sink=0, recent=4)
@example(seed=11, bits=8, dtype=torch.float32, group=True, g=3, d=64, r=16, s=333, lengths=True, budget=20,
         frac=1 / 16, sink=4, recent=16)
def test_native_decode_matches_definition(seed, bits, dtype, group, g, d, r, s, lengths, budget, frac,
                                          sink, recent):
    c = make_case(seed, 2, 2, g, 1, s, d, min(r, d), bits, dtype, lengths=lengths)
    args = (budget, frac, sink, recent)
    with native_calls() as calls:
        out = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, c.lengths, *args, group, None)
    assert calls, "the call did not take the native kernel"
    assert_ds_decode_matches_oracle(out, c, *args, group, None, TOL[dtype])


def exact_score_case(seed: int, bits: int, values: torch.Tensor, lengths=None, g: int = 3, d: int = 64, r: int = 16,
                     dtype=torch.float32):
    """A case (batch 2, 2 KV heads of g query heads) whose label scores are integers computed exactly by any
    summation order, ordered as ``values`` (distinct integers, one per position): token t's label channels are
    ``values[t]`` plus a pattern of integers from 0 to the code range (so 8- and 4-bit codes are that pattern,
    exactly), and the queries are small positive integers on the label channels. Every implementation then
    selects the same positions, and its output can be compared on every row, without leaving out near-ties."""
    c = make_case(seed, 2, 2, g, 1, values.numel(), d, r, bits, dtype, lengths=False)
    levels = 15 if bits == 4 else 255
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, levels + 1, (r,), generator=gen).float()
    pattern[0], pattern[-1] = 0, levels
    for h in range(2):
        ch = c.channels[h]
        c.k[:, h, :, ch] = (values.float()[:, None] + pattern).to(dtype)
        c.q[:, g * h:g * h + g, :, ch] = torch.randint(1, 4, (2, g, 1, r), generator=gen).to(dtype)
    R.label_write(c.k, c.channels, torch.arange(values.numel()), c.data, c.scale, c.zero, bits)
    c.lengths = lengths
    return c


def assert_exact_selection_output(out, c, budget, frac, sink, recent, group, sm_scale, tol=1e-5):
    """``out`` equals the definition on a case whose scores are exact (:func:`exact_score_case`): every row."""
    sc = R.label_scores(c.q, *c.labels, None, c.lengths, group)
    want = R.sparse_attention(c.q, c.k, c.v, R.select_topk(sc, budget, frac, sink, recent), sm_scale)
    gap = float((out.float() - want.float()).abs().max())
    assert torch.allclose(out.float(), want.float(), atol=tol, rtol=tol), gap


# Every label format and width on each scoring path (16-token blocks of codes on AVX-512, 8-token blocks, the
# scalar tail), 1 to 6 query heads per KV head, group and per-head selection: every output row compared.
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("r,d", [(16, 64), (32, 128), (8, 32)])
@pytest.mark.parametrize("g,group", [(1, True), (3, True), (4, False), (6, True)])
def test_native_decode_exact_scores_every_format(bits, r, d, g, group):
    values = torch.randperm(261, generator=torch.Generator().manual_seed(bits * r + g))
    c = exact_score_case(bits + g, bits, values, torch.tensor([261, 200]), g=g, d=d, r=r)
    args = (40, 0.0, 2, 3, group, 1e-4)
    with native_calls() as calls:
        out = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, c.lengths, *args)
    assert calls
    assert_exact_selection_output(out, c, *args)


# Rows of 4K positions and more: the kernel selects from a strided sample's candidates there (and from every key
# when the sample misleads), below that from every key. sm_scale is small, so every selected row weighs about the
# same in the output and one wrong row moves it by far more than the tolerance.
@pytest.mark.parametrize("bits,group,frac,budget,sink,recent,lengths", [
    (16, True, 1 / 16, 1, 4, 16, None),  # the default configuration
    (8, True, 1 / 16, 1, 4, 16, [5000, 4200]),  # rows of 4-8K, sampled
    (8, True, 0.0, 700, 0, 0, [9000, 8500]),
    (4, False, 1 / 16, 1, 1, 3, None),
    (16, False, 0.0, 3000, 2, 0, [8300, 9000]),
    (16, True, 0.0, 1, 0, 0, None),  # one position
    (8, False, 0.0, 8990, 4, 4, None),  # all but a few: the floor is the sample's lowest key
])
def test_native_decode_long_rows_match_definition(bits, group, frac, budget, sink, recent, lengths):
    values = torch.randperm(9000, generator=torch.Generator().manual_seed(bits))
    c = exact_score_case(16, bits, values, None if lengths is None else torch.tensor(lengths))
    args = (budget, frac, sink, recent, group, 1e-4)
    with native_calls() as calls:
        out = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, c.lengths, *args)
    assert calls
    assert_exact_selection_output(out, c, *args)


@pytest.mark.parametrize("group", [True, False])
def test_native_decode_long_rows_rank_nan_scores_first(group):
    """A NaN label score ranks first (NaN propagates as in dense attention) on a long row too, whose candidates are
    keyed a block of tokens at a time and the row's tail one at a time: NaN labels inside a block, in the tail
    before the recent positions, and in a batch row and head of their own."""
    values = torch.randperm(9000, generator=torch.Generator().manual_seed(6))
    c = exact_score_case(18, 16, values)
    for b, h, t in [(0, 1, 17), (0, 1, 4000), (0, 1, 8981), (1, 0, 5)]:
        c.data[b, h, t, 3] = float("nan")
    args = (1, 1 / 16, 4, 16, group, 1e-4)
    with native_calls() as calls:
        out = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, None, *args)
    assert calls
    assert_exact_selection_output(out, c, *args)


@pytest.mark.parametrize("n,budget,group", [(700, 90, True), (700, 90, False), (5000, 313, True)])
def test_native_decode_takes_exactly_the_budget_from_tied_scores(n, budget, group):
    """Runs of 40 positions share a score, and the budget ends inside a run (30 of 40 at 700 positions, 33 of 40 at
    5000, a sampled row): the select must take exactly that many of the tied positions, whichever. Each run's K/V
    rows are one row repeated, so any choice among them gives the definition's output, and one position too many
    or too few moves it."""
    values = torch.arange(n) // 40
    c = exact_score_case(19, 16, values, g=3)
    first = (torch.arange(n) // 40) * 40
    c.k[:] = c.k[:, :, first]
    c.v[:] = c.v[:, :, first]
    args = (budget, 0.0, 0, 0, group, 1e-4)
    with native_calls() as calls:
        out = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, None, *args)
    assert calls
    assert_exact_selection_output(out, c, *args)


@pytest.mark.parametrize("group", [True, False])
def test_native_decode_periodic_scores_match_definition(group):
    """The best 1024 positions every 8th one after the sink: a strided sample of the row sees only them, and its
    estimate of a 2048-position budget's threshold is far too high."""
    n = 8192 + 4
    values = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    values[4::8] += n
    c = exact_score_case(17, 16, values)
    args = (2048, 0.0, 4, 0, group, 1e-4)
    with native_calls() as calls:
        out = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, None, *args)
    assert calls
    assert_exact_selection_output(out, c, *args)


def test_native_decode_reads_hf_layout_views():
    """K/V and labels as the caches hold them: a prefix view of a longer (static) buffer; q transposed from
    [B, L, H, D] (the model's projection layout)."""
    c = make_case(11, 2, 3, 3, 1, 300, 64, 16, 16, lengths=False)
    big = make_case(11, 2, 3, 3, 1, 400, 64, 16, 16)
    big.channels = c.channels
    for name in ("k", "v", "data"):
        buf = getattr(big, name)
        buf[:, :, :300] = getattr(c, name)
        setattr(big, name, buf[:, :, :300])
    q = c.q.transpose(1, 2).contiguous().transpose(1, 2)
    out = C.ds_decode(q, big.k, big.v, *big.labels, None, None, None, 36, 0.0, 0, 0, True, None)
    want = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, None, 36, 0.0, 0, 0, True, None)
    assert assert_ds_decode_matches_oracle(out, c, 36, 0.0, 0, 0, True, None, TOL[torch.float32]) > 0
    assert torch.allclose(out, want, atol=1e-6)


@pytest.mark.parametrize("bits,r,d", [(8, 16, 64), (4, 16, 64), (4, 32, 128), (8, 32, 128)])
def test_native_decode_reads_label_rows_that_are_not_packed(bits, r, d):
    """Code rows further apart than their width (a view of wider rows) take the strided gather of 16-token code
    blocks, not the packed one that the cache's own layout takes: against the definition."""
    c = make_case(bits + r, 2, 2, 3, 1, 300, d, r, bits)
    width = c.data.shape[-1]
    wide = torch.full((*c.data.shape[:-1], width + 16), 255, dtype=torch.uint8)
    wide[..., :width] = c.data
    c.data = wide[..., :width]
    assert c.data.stride(-2) != width
    args = (40, 0.0, 2, 3, True, None)
    with native_calls() as calls:
        out = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, None, *args)
    assert calls
    assert assert_ds_decode_matches_oracle(out, c, *args, TOL[torch.float32]) > 0


def test_native_nan_query_propagates_and_empty_rows_are_zero():
    c = make_case(12, 2, 1, 3, 1, 50, 32, 8, 16, lengths=False)
    q = c.q.clone()
    q[0, 1, 0, 0] = float("nan")
    out = C.ds_decode(q, c.k, c.v, *c.labels, None, None, torch.tensor([50, 0]), 8, 0.0, 1, 2, True, None)
    assert torch.isnan(out[0]).any()  # NaN scores rank first and the NaN query's logits are NaN
    assert (out[1] == 0).all()  # a row with no valid position attends nothing: 0 by contract


# With fewer than two tasks (batch x KV heads: 4 here) per thread, every task's scoring and attention are split
# into pieces that all threads share (3 threads: 2 pieces per task, 8: 4); 1 thread runs whole tasks.
@pytest.mark.parametrize("bits,group,n,budget,frac", [
    (16, True, 9000, 1, 1 / 16),  # long rows: the sampled select, pieces of a 9000-token row
    (8, False, 261, 40, 0.0),  # per-head selection: pieces of each head's selection
    (4, True, 261, 300, 0.0),  # every position kept
    (16, True, 20, 3, 0.0),  # fewer rows than pieces: empty pieces
])
def test_native_decode_split_across_threads_matches_definition(bits, group, n, budget, frac):
    values = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    c = exact_score_case(19, bits, values, torch.tensor([n, max(1, n - 7)]))
    args = (budget, frac, 2, 3, group, 1e-4)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3, 8):
            torch.set_num_threads(threads)
            with native_calls() as calls:
                out = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, c.lengths, *args)
            assert calls
            assert_exact_selection_output(out, c, *args)
    finally:
        torch.set_num_threads(before)


def test_native_decode_first_block_of_minus_infinite_logits_weighs_nothing():
    """Sixteen forced sink rows whose logits are -inf (a key channel outside the labels is -inf: the scores stay
    finite), the whole first block of the online softmax, and finite rows after them: the -inf rows weigh 0, as in
    a softmax over the whole selection."""
    c = make_case(18, 1, 2, 3, 1, 120, 32, 8, 16)
    for h in range(2):
        free = next(i for i in range(32) if i not in c.channels[h].tolist())
        c.q[:, 3 * h:3 * h + 3, :, free] = 1.0
        c.k[:, h, :16, free] = float("-inf")
    with native_calls() as calls:
        out = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, None, 40, 0.0, 16, 0, True, None)
    assert calls and torch.isfinite(out).all()
    assert assert_ds_decode_matches_oracle(out, c, 40, 0.0, 16, 0, True, None, TOL[torch.float32]) > 0


def test_native_threads_agree_with_one_thread():
    c = make_case(13, 4, 3, 3, 1, 700, 64, 16, 16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, c.lengths, 36, 1 / 16, 4, 16, True, None)
        torch.set_num_threads(2)
        two = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, c.lengths, 36, 1 / 16, 4, 16, True, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_masked_and_multi_query_calls_take_the_torch_path():
    c = make_case(14, 1, 2, 2, 2, 90, 32, 8, 16, valid="shared", bias=True)
    with native_calls() as calls:
        out = C.ds_decode(c.q, c.k, c.v, *c.labels, c.valid, c.bias, None, 20, 0.0, 1, 2, True, None)
    assert not calls
    assert_ds_decode_matches_oracle(out, c, 20, 0.0, 1, 2, True, None, TOL[torch.float32])


def test_without_a_compiler_the_torch_path_runs_and_says_why(monkeypatch):
    native.library.cache_clear()
    monkeypatch.setattr(native, "_compiler", lambda: None)
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert native.library() is None
        c = make_case(15, 1, 2, 2, 1, 90, 32, 8, 16)
        out = C.ds_decode(c.q, c.k, c.v, *c.labels, None, None, c.lengths, 20, 0.0, 1, 2, True, None)
        assert_ds_decode_matches_oracle(out, c, 20, 0.0, 1, 2, True, None, TOL[torch.float32])
        native.library.cache_clear()
        monkeypatch.setenv("DSC_NATIVE", "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # choosing the torch path on purpose is silent
            assert native.library() is None
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("bits,dtype,fp32_labels", [(16, torch.float32, False), (16, torch.bfloat16, False),
                                                    (16, torch.bfloat16, True), (8, torch.float32, False),
                                                    (4, torch.bfloat16, False)])
def test_native_decode_first_checks_that_a_row_still_holds_what_was_labelled(bits, dtype, fp32_labels):
    """``check_row``: the planned decode step's continuity check (a reused cache prefilled elsewhere leaves stale
    labels). The kernel decodes when the labels of that row are those of the keys' row, bit for bit, and refuses
    (None) when one batch row and head changed there, or when a non-finite quantized label makes it undecidable."""
    from dsc.kernels import checks

    c = make_case(5, 2, 2, 2, 1, 40, 32, 8, bits, dtype)
    data = c.data.float() if fp32_labels else c.data  # fp32 labels of 16-bit keys: the same values

    def decode(k, row, labels=(data, c.scale, c.zero)):
        return native.ds_decode(c.q, k, c.v, c.channels, *labels, bits, None, 8, 0.0, 1, 2, True, 0.3,
                                checks.topk_width(40, 8, 0.0), row)

    want = decode(c.k, -1)
    assert torch.equal(decode(c.k, 20), want)
    changed = c.k.clone()
    changed[1, 1, 20] += 1
    assert decode(changed, 20) is None and torch.equal(decode(changed, 19), decode(c.k, -1))
    if bits != 16:
        nan = c.k.clone()
        nan[0, 0, 20] = float("nan")
        labels = [t.clone() for t in (c.data, c.scale, c.zero)]
        R.label_write(nan[:, :, 20:21], c.channels, torch.tensor([20]), *labels, bits)  # the torch path's codes
        assert decode(nan, 20, labels) is None
