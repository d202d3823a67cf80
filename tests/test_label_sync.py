"""``dsc::label_sync``, a static cache's label step decided on the device (no host reads, so a CUDA graph can
replay it): the reference against the rule written out case by case (trusted prefix left alone, stale prefix
relabelled, per batch row and KV head, NaN rows), and the Triton kernel (interpreter) against the reference, for
every label format."""
import pytest
import torch

from dsc.kernels import reference as R

B, HKV, S, D, R_CH = 2, 3, 40, 32, 8
BITS = (16, 8, 4)


def _labels_of(k, ch, bits, n):
    """Labels of ``k``'s first ``n`` rows (the label write oracle), in a fresh cache of S rows."""
    cache = list(R.alloc_labels(B, HKV, S, R_CH, bits, dtype=k.dtype))
    R.label_write(k[:, :, :n], ch, torch.arange(n), *cache, bits)
    return cache


def _case(bits, seed=0, dtype=torch.float32):
    """Sequence A's keys and labels of its first 20 rows (state: 20 rows written, no rebuilds), the channels, and
    a different sequence B's keys."""
    gen = torch.Generator().manual_seed(seed)
    ka = torch.randn(B, HKV, S, D, generator=gen).to(dtype)
    kb = torch.randn(B, HKV, S, D, generator=gen).to(dtype)
    ch = torch.stack([torch.randperm(D, generator=gen)[:R_CH] for _ in range(HKV)])
    state = torch.zeros(B, HKV, 2, dtype=torch.int64)
    state[..., 0] = 20
    return ka, kb, ch, _labels_of(ka, ch, bits, 20), state


def _sync(fn, k, p0, t, ch, cache, state, bits):
    """One step writing rows ``[p0, p0 + t)`` (already in ``k``), through ``fn`` (reference or kernel)."""
    fn(k, ch, torch.arange(p0, p0 + t), *cache, bits, state)


def _same_rows(cache, want, rows, bits):
    parts = range(1 if bits == 16 else 3)
    return all(torch.equal(cache[i][:, :, rows], want[i][:, :, rows]) for i in parts)


@pytest.mark.parametrize("bits", BITS)
def test_reference_trusts_a_continuing_step_and_rebuilds_a_stale_prefix(bits):
    ka, kb, ch, cache, state = _case(bits)
    marked = [x.clone() for x in cache]
    marked[0][:, :, 5] = marked[0][:, :, 6]  # a stored row that is wrong for A, but not the one checked
    # continuing A at position 20: the prefix is trusted (row 5 left as it was), row 20 written
    _sync(R.label_sync, ka, 20, 1, ch, marked, state, bits)
    want = _labels_of(ka, ch, bits, 21)
    assert _same_rows(marked, want, slice(20, 21), bits) and _same_rows(marked, want, slice(6, 20), bits)
    assert torch.equal(marked[0][:, :, 5], marked[0][:, :, 6]) and not torch.equal(want[0][:, :, 5], want[0][:, :, 6])
    assert state[..., 0].eq(21).all() and state[..., 1].eq(0).all()
    # sequence B prefilled elsewhere into the same buffer, first step at 12 (< rows written): row 11 differs, so
    # rows [0, 12) are relabelled from B
    _sync(R.label_sync, kb, 12, 1, ch, cache, state, bits)
    assert _same_rows(cache, _labels_of(kb, ch, bits, 13), slice(0, 13), bits)
    assert state[..., 0].eq(13).all() and state[..., 1].eq(1).all()


@pytest.mark.parametrize("bits", BITS)
def test_reference_rebuilds_past_the_rows_it_wrote_and_only_the_stale_batch_row(bits):
    ka, kb, ch, cache, state = _case(bits)
    # position 25 > 20 rows written: rows 20-24 were written elsewhere, so the prefix is relabelled
    _sync(R.label_sync, ka, 25, 2, ch, cache, state, bits)
    assert _same_rows(cache, _labels_of(ka, ch, bits, 27), slice(0, 27), bits)
    assert state[..., 0].eq(27).all() and state[..., 1].eq(1).all()
    # batch row 1 replaced by B: only its heads rebuild
    k = ka.clone()
    k[1] = kb[1]
    _sync(R.label_sync, k, 27, 1, ch, cache, state, bits)
    assert _same_rows(cache, _labels_of(k, ch, bits, 28), slice(0, 28), bits)
    assert state[0, :, 1].eq(1).all() and state[1, :, 1].eq(2).all()


@pytest.mark.parametrize("bits", BITS)
def test_reference_position_zero_starts_a_sequence_and_nan_rows_match(bits):
    ka, kb, ch, cache, state = _case(bits)
    before = [x.clone() for x in cache]
    _sync(R.label_sync, kb, 0, 4, ch, cache, state, bits)  # a new prefill writes its rows and trusts nothing else
    assert _same_rows(cache, _labels_of(kb, ch, bits, 4), slice(0, 4), bits)
    assert _same_rows(cache, before, slice(4, S), bits) and state[..., 1].eq(0).all() and state[..., 0].eq(4).all()
    # a NaN key in the checked row: its stored label (NaN, or codes of NaN) still matches; no rebuild every step
    k = ka.clone()
    k[:, :, 19] = float("nan")
    cache, state = _labels_of(k, ch, bits, 20), torch.tensor([[[20, 0]] * HKV] * B)
    _sync(R.label_sync, k, 20, 1, ch, cache, state, bits)
    assert state[..., 1].eq(0).all()


SCENARIOS = [  # (keys of the step: "a" | "b" | "mixed", first position, new rows, rows written before)
    ("a", 20, 1, 20), ("b", 12, 1, 20), ("a", 25, 2, 20), ("mixed", 20, 1, 20), ("b", 0, 5, 20), ("a", 7, 3, 20),
    ("b", 20, 1, 20), ("a", 1, 1, 0)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_triton_label_sync_matches_reference(bits, scenario):
    from dsc.kernels import triton_ops

    which, p0, t, written = scenario
    for dtype in (torch.float32, torch.bfloat16) if bits == 16 else (torch.float32,):
        ka, kb, ch, cache, state = _case(bits, seed=p0, dtype=dtype)
        k = {"a": ka, "b": kb, "mixed": torch.cat([ka[:1], kb[1:]])}[which]
        state[..., 0] = written
        want, want_state = [x.clone() for x in cache], state.clone()
        _sync(R.label_sync, k, p0, t, ch, want, want_state, bits)
        _sync(triton_ops.label_sync, k, p0, t, ch, cache, state, bits)
        assert torch.equal(state, want_state), scenario
        for got, exp in zip(cache, want):
            assert torch.equal(got, exp), scenario
