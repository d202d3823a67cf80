"""The fast CPU label write (``dsc/kernels/cpu.py``: the native kernel, and the torch path it leaves other layouts
to) against the plain-torch reference oracle, for every label format (16/8/4 bits), the decode step (T = 1) and
multi-token writes (T > 1, prefill / continued prompts), positions shared ``[T]`` or per sequence ``[B, T]``, odd
and even ``r``, keys in HF's transposed layout, and labels with non-finite values."""
import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from dsc.kernels import cpu as C
from dsc.kernels import native as N
from dsc.kernels import reference as R

PATHS = ("native", "torch")


@contextlib.contextmanager
def _path(name):
    """Run the CPU label write on one path: ``native`` as built, ``torch`` with the native kernel declining."""
    if name == "native":
        yield
    else:
        with mock.patch.object(N, "label_write", lambda *a, **k: False):
            yield


def _case(seed, bits, t, batched, r, b=2, hkv=3, s=29, d=32, dtype=torch.float32, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    if transposed:  # HF computes K as [B, T, Hkv, D] and transposes: a non-contiguous view
        keys = torch.randn(b, t, hkv, d, generator=gen).to(dtype).transpose(1, 2)
    else:
        keys = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    ch = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(hkv)])
    if batched:
        pos = torch.stack([torch.randperm(s, generator=gen)[:t] for _ in range(b)])
    else:
        pos = torch.randperm(s, generator=gen)[:t]
    # Both caches start from the same non-zero contents, so a write to a wrong position or a missed one shows.
    cache = list(R.alloc_labels(b, hkv, s, r, bits, dtype=dtype))
    if bits == 16:
        cache[0].copy_(torch.randn(cache[0].shape, generator=gen))
    else:
        cache[0].copy_(torch.randint(0, 256, cache[0].shape, generator=gen))
        cache[1].copy_(torch.rand(cache[1].shape, generator=gen))
        cache[2].copy_(torch.randn(cache[2].shape, generator=gen))
    return keys, ch, pos, cache


def _check(seed, bits, t, batched, r, **kw):
    keys, ch, pos, cache = _case(seed, bits, t, batched, r, **kw)
    want = [x.clone() for x in cache]
    R.label_write(keys, ch, pos, *want, bits)
    assert not torch.equal(want[0], cache[0])  # the write did something
    for path in PATHS:
        got = [x.clone() for x in cache]
        with _path(path):
            C.label_write(keys, ch, pos, *got, bits)
        for name, w, g in zip(("data", "scale", "zero"), want, got):
            assert torch.equal(w, g), f"{path}: {name} differs (bits={bits}, T={t}, batched={batched}, r={r})"


# Explicit examples: every format x {decode step, multi-token} x {positions [T], [B, T]}, odd r among them
# (the ci profile is derandomized; these always run).
@given(seed=st.integers(0, 10**6), bits=st.sampled_from([16, 8, 4]), t=st.integers(1, 7), batched=st.booleans(),
       r=st.integers(1, 17), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       transposed=st.booleans())
@example(seed=1, bits=16, t=1, batched=False, r=9, dtype=torch.float32, transposed=False)
@example(seed=2, bits=16, t=1, batched=True, r=8, dtype=torch.bfloat16, transposed=True)
@example(seed=3, bits=16, t=5, batched=False, r=7, dtype=torch.float16, transposed=False)
@example(seed=4, bits=16, t=6, batched=True, r=16, dtype=torch.float32, transposed=True)
@example(seed=5, bits=8, t=1, batched=False, r=16, dtype=torch.float32, transposed=True)
@example(seed=6, bits=8, t=1, batched=True, r=5, dtype=torch.float32, transposed=False)
@example(seed=7, bits=8, t=4, batched=False, r=11, dtype=torch.bfloat16, transposed=False)
@example(seed=8, bits=8, t=7, batched=True, r=8, dtype=torch.float16, transposed=True)
@example(seed=9, bits=4, t=1, batched=False, r=9, dtype=torch.float32, transposed=False)
@example(seed=10, bits=4, t=1, batched=True, r=16, dtype=torch.bfloat16, transposed=True)
@example(seed=11, bits=4, t=3, batched=False, r=1, dtype=torch.float32, transposed=True)
@example(seed=12, bits=4, t=7, batched=True, r=13, dtype=torch.float16, transposed=False)
def test_cpu_label_write_equals_reference(seed, bits, t, batched, r, dtype, transposed):
    _check(seed, bits, t, batched, r, dtype=dtype, transposed=transposed)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", ["nan", "inf", "range"])
def test_cpu_label_write_non_finite_labels_as_the_reference(bits, bad):
    """A label with NaN or inf, or whose range overflows fp32 (max - min = inf): the native kernel declines the
    row and the torch path writes what the reference writes (scale/zero NaN or inf, the codes its casts give)."""
    keys, ch, pos, cache = _case(3, bits, 2, False, 6)
    value = {"nan": float("nan"), "inf": float("inf"), "range": 3e38}[bad]
    keys[1, 2, 1, ch[2, 0]] = value
    if bad == "range":
        keys[1, 2, 1, ch[2, 1]] = -3e38
    want = [x.clone() for x in cache]
    R.label_write(keys, ch, pos, *want, bits)
    for path in PATHS:
        got = [x.clone() for x in cache]
        with _path(path):
            C.label_write(keys, ch, pos, *got, bits)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    assert not torch.isfinite(want[1][1, 2, pos[1]])  # the case is what it says


def test_native_label_write_takes_the_decode_step():
    """The decode step's write (T = 1, positions [1]) is the native kernel's when it is built."""
    if N.library() is None:
        pytest.skip("no native kernel on this machine")
    keys, ch, pos, cache = _case(0, 8, 1, False, 7)
    assert N.label_write(keys, ch, pos, *cache, 8)


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("t,batched", [(1, False), (1, True), (5, False), (5, True)])
def test_cpu_label_write_never_calls_the_reference(bits, t, batched, monkeypatch):
    """The fast path is its own implementation: comparing it with the reference compares two implementations."""
    keys, ch, pos, cache = _case(0, bits, t, batched, 7)
    want = [x.clone() for x in cache]
    R.label_write(keys, ch, pos, *want, bits)

    def boom(*a, **k):
        raise AssertionError("the CPU label write called the reference")

    for name in ("label_write", "quantize", "pack4"):
        monkeypatch.setattr(R, name, boom)
    C.label_write(keys, ch, pos, *cache, bits)
    for w, g in zip(want, cache):
        assert torch.equal(w, g)


def test_cpu_label_write_hand_computed_4bit():
    """One token, r = 3 (odd: the last byte's high nibble stays 0): labels 0, 1, 3 (channels 3, 2, 0 in that order)
    -> zero 0, scale 3/15 = 0.2, codes 0, 5, 15; channel 2j in the low nibble of byte j."""
    keys = torch.zeros(1, 1, 2, 4)
    keys[0, 0, 1] = torch.tensor([3.0, 9.0, 1.0, 0.0])
    data, scale, zero = R.alloc_labels(1, 1, 6, 3, 4)
    C.label_write(keys, torch.tensor([[3, 2, 0]]), torch.tensor([4, 2]), data, scale, zero, 4)
    assert data.shape[-1] == 2
    assert data[0, 0, 2].tolist() == [0 | (5 << 4), 15]
    assert data[0, 0, 4].tolist() == [0, 0]  # token 0: all zeros -> scale 0, codes 0
    assert scale[0, 0, 2].item() == pytest.approx(0.2) and zero[0, 0, 2].item() == 0.0
    assert scale[0, 0, 4].item() == 0.0 and (data[0, 0, [0, 1, 3, 5]] == 0).all()
