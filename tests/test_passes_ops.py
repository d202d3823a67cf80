"""``dsc::site_attention`` against SDPA: masks (bool / additive, broadcast shapes), ``is_causal``, ``scale``, GQA,
query lengths, both cache kinds; exact whenever the budget covers every valid token; opcheck."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dsc.calibration.config import ChannelConfig
from dsc.config import Selection
from dsc.passes.runtime import Runtime, SiteSpec

CFG = ChannelConfig.random(1, 4, 2, 16, seed=3)
# Every example here brings a fresh static cache to the same site, which is what the store's "rebuilt each time"
# warning is about; it is expected in this file.
pytestmark = pytest.mark.filterwarnings("ignore:dsparse. a static KV cache:RuntimeWarning")


def _site(budget=64, group=True, dense_prefill=False, bits=16, r=8, min_length=0) -> tuple[Runtime, int]:
    """A fresh runtime (what a compiled model's backend owns) holding one site: ``(runtime, site index)``."""
    rt = Runtime()
    sel = Selection(budget=budget, r=r, label_bits=bits, sink=1, recent=1, gqa="group" if group else "head",
                    min_length=min_length)
    return rt, rt.add_site(SiteSpec(label=rt.label_spec(CFG, 0, r, bits), layer=0, selection=sel,
                                    dense_prefill=dense_prefill))


@st.composite
def cases(draw):
    b, g, lq = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 1, 3]))
    s = draw(st.integers(max(lq, 2), 12))
    mask_kind = draw(st.sampled_from(["none", "bool", "additive", "causal"]))
    shape = draw(st.sampled_from([(b, 1, lq, s), (1, 1, 1, s), (b, 2 * g, lq, s), (lq, s)]))
    if mask_kind != "none" and len(shape) == 4 and shape[2] == 1 and lq > 1:
        shape = (b, 1, lq, s)
    return dict(b=b, g=g, lq=lq, s=s, mask=mask_kind, shape=shape, scale=draw(st.sampled_from([None, 0.3])),
                group=draw(st.booleans()), cache=draw(st.sampled_from(["static", "dynamic"])),
                bits=draw(st.sampled_from([16, 8, 4])), seed=draw(st.integers(0, 2**16)))


@given(cases())
def test_full_budget_equals_sdpa(c):
    gen = torch.Generator().manual_seed(c["seed"])
    b, hkv, lq, s, d = c["b"], 2, c["lq"], c["s"], 16
    hq = hkv * c["g"]
    q = torch.randn(b, hq, lq, d, generator=gen)
    k = torch.randn(b, hkv, s, d, generator=gen)
    v = torch.randn(b, hkv, s, d, generator=gen)
    mask = None
    if c["mask"] in ("bool", "additive"):
        keep = torch.rand(c["shape"], generator=gen) > 0.4
        keep[..., 0] = True  # no fully masked row (SDPA gives NaN there)
        mask = keep if c["mask"] == "bool" else torch.where(keep, torch.randn(c["shape"], generator=gen),
                                                            torch.tensor(torch.finfo(torch.float32).min))
    is_causal = c["mask"] == "causal"
    scale = c["scale"] if c["scale"] is not None else 1 / math.sqrt(d)
    rt, site = _site(budget=64, group=c["group"], bits=c["bits"])
    t = min(lq, s)
    if c["cache"] == "static":
        out = torch.ops.dsc.site_attention(rt.key, site, q, k, v, None, k[:, :, s - t:], torch.arange(s - t, s),
                                           mask, is_causal, scale, "static")
    else:
        out = torch.ops.dsc.site_attention(rt.key, site, q, k, v, k[:, :, : s - t], k[:, :, s - t:], None, mask,
                                           is_causal, scale, "dynamic")
    assert rt.stats["sparse_calls"] == 1 and not rt.stats["dense_calls"]  # the selection path, not SDPA
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(c["g"], 1), v.repeat_interleave(c["g"], 1),
                                         attn_mask=mask, is_causal=is_causal, scale=scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_prefill_is_dense_and_labels_written_for_new_tokens_only():
    rt, site = _site(budget=2, dense_prefill=True)
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    d0, w0 = rt.stats["dense_calls"], rt.stats["label_writes"]
    out = torch.ops.dsc.site_attention(rt.key, site, q, k, v, None, k, None, None, True, 0.25, "dynamic")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, ref)
    assert rt.stats["dense_calls"] - d0 == 1 and rt.stats["label_writes"] - w0 == 1
    # one decode step on the same chain: labels extended by one token, sparse path taken
    k2 = torch.cat([k, torch.randn(1, 2, 1, 16)], 2)
    v2 = torch.cat([v, torch.randn(1, 2, 1, 16)], 2)
    s0, r0, w0 = rt.stats["sparse_calls"], rt.stats["label_rebuilds"], rt.stats["label_writes"]
    torch.ops.dsc.site_attention(rt.key, site, q[:, :, :1], k2, v2, k, k2[:, :, 5:], None, None, False, 0.25, "dynamic")
    assert rt.stats["sparse_calls"] - s0 == 1 and rt.stats["label_writes"] - w0 == 1
    assert rt.stats["label_rebuilds"] == r0  # the chain was found: only the new token was labelled
    # the same step from a copy of the past (out of sync): rebuilt from the copy, not wrong, not an error
    torch.ops.dsc.site_attention(rt.key, site, q[:, :, :1], k2.clone(), v2, k.clone(), k2[:, :, 5:], None, None, False,
                                 0.25, "dynamic")
    assert rt.stats["label_rebuilds"] == r0 + 1


def test_min_length_keeps_short_caches_dense():
    rt, site = _site(budget=2, min_length=100)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    out = torch.ops.dsc.site_attention(rt.key, site, q, k, v, None, k[:, :, 8:], torch.tensor([8]), None, False, 0.25,
                                       "static")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True))


def test_opcheck():
    rt, site = _site(budget=3)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    mask = torch.ones(1, 1, 1, 7, dtype=torch.bool)
    # the op keeps a side store, so opcheck's repeated calls must see a fresh cache each time: static writes are
    # idempotent (same positions, same keys)
    torch.library.opcheck(torch.ops.dsc.site_attention.default,
                          (rt.key, site, q, k, v, None, k[:, :, 6:], torch.tensor([6]), mask, False, 0.25, "static"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_valid_prefix_trims_only_masks_that_are_one_shared_prefix():
    """A decode step over a static buffer (every row may see exactly [0, n)) runs on the first n positions, with a
    zero bias dropped; padding (rows of different lengths), holes, per-head masks and a real bias are kept whole."""
    from dsc.passes.site_op import _valid_prefix

    s = 10
    prefix = (torch.arange(s) < 6).view(1, 1, 1, s).expand(2, 1, 1, s)
    bias = torch.zeros(2, 1, 1, s).masked_fill(~prefix, torch.finfo(torch.float32).min)
    assert _valid_prefix(prefix, bias, s) == (6, None, None)
    real_bias = bias.clone()
    real_bias[..., 2] = -1.5
    n, valid, kept = _valid_prefix(prefix, real_bias, s)
    assert n == 6 and valid is None and torch.equal(kept, real_bias[..., :6])
    padded = prefix.clone()
    padded[1, ..., 0] = False  # left padding in the second row: rows differ
    holes = prefix.clone()
    holes[..., 3] = False
    per_head = prefix.expand(2, 4, 1, s)
    for mask in (padded, holes, per_head):
        n, valid, _ = _valid_prefix(mask, None, s)
        assert n == s and valid is mask
    assert _valid_prefix(None, None, s) == (s, None, None)
