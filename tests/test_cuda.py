"""On a CUDA GPU (skipped elsewhere; CI has none): the compiled Triton kernels against the reference, zero-copy
attention over pinned host K/V, and the dsparse backend end to end with inductor, on device and offloaded.

Run on a GPU machine with the interpreter off: ``TRITON_INTERPRET=0 pytest tests/test_cuda.py``.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings

import dsc.kernels  # noqa: F401  (registers torch.ops.dsc)
from dsc.kernels import reference as R
from dsc.kernels import triton_ops as T
from dsc.kernels.testing import assert_ds_decode_matches_oracle, assert_valid_selection, dense_attention, make_case
from helpers import CHANNELS, assert_same, compiled_tiny, decode_both_ways, generate, padded_batch, tiny
from kernel_helpers import TOL, cases, with_formats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU and TRITON_INTERPRET=0")
CUDA = torch.device("cuda")


def _to(c, device):
    for name in ("q", "k", "v", "channels", "data", "scale", "zero", "valid", "bias", "lengths"):
        t = getattr(c, name)
        if t is not None:
            setattr(c, name, t.to(device))
    return c


@settings(max_examples=40)
@given(cases(max_s=3000))
@with_formats(s=301)
def test_compiled_kernels_match_reference(case):
    p, sel = case
    if sel["group"] and p["valid"] == "per_head":
        p["valid"] = "shared"  # group mode selects a group's common valid set (the full-budget check needs it)
    cpu = make_case(**p)
    c = _to(make_case(**p), CUDA)
    args = (sel["budget"], sel["frac"], sel["sink"], sel["recent"])
    labels = R.alloc_labels(p["b"], p["hkv"], p["s"], p["r"], p["bits"], p["dtype"], CUDA)
    T.label_write(c.k, c.channels, torch.arange(p["s"], device=CUDA), *labels, p["bits"])
    if p["bits"] == 16:
        assert torch.equal(labels[0].cpu(), cpu.data)
    else:  # GPU fp32 division may round a code the other way at a half step: compare values within one step
        got = R.dequantize(*(t.cpu() for t in labels), p["bits"], p["r"])
        want = R.dequantize(cpu.data, cpu.scale, cpu.zero, p["bits"], p["r"])
        assert ((got - want).abs() <= 1.01 * cpu.scale[..., None] + 1e-6).all()
    ref_sc = R.label_scores(cpu.q, *cpu.labels, cpu.valid, cpu.lengths, sel["group"])
    got_sc = T.label_scores(c.q, *c.labels, c.valid, c.lengths, sel["group"]).cpu()
    assert torch.equal(torch.isinf(ref_sc), torch.isinf(got_sc))
    fin = torch.isfinite(ref_sc)
    assert torch.allclose(ref_sc[fin], got_sc[fin], rtol=1e-4, atol=1e-4 * (1 + ref_sc[fin].abs().max().item()))
    idx = T.select_topk(got_sc.to(CUDA), *args)
    assert_valid_selection(got_sc, idx.cpu(), *args)
    ref_o = R.sparse_attention(cpu.q, cpu.k, cpu.v, idx.cpu(), p["d"] ** -0.5, cpu.bias)
    got_o = T.sparse_attention(c.q, c.k, c.v, idx, p["d"] ** -0.5, c.bias)
    assert got_o.dtype == c.q.dtype and got_o.shape == c.q.shape
    tol = TOL[p["dtype"]]
    assert torch.allclose(ref_o.float(), got_o.float().cpu(), atol=tol, rtol=tol)
    # the op through the dispatcher (CUDA kernel) against the plain-torch oracle of the definition
    out = torch.ops.dsc.ds_decode(c.q, c.k, c.v, *c.labels, c.valid, c.bias, c.lengths, *args, sel["group"], None)
    assert_ds_decode_matches_oracle(out.cpu(), cpu, *args, sel["group"], None, tol)
    full = T.ds_decode(c.q, c.k, c.v, *c.labels, c.valid, c.bias, c.lengths, p["s"] + 1, 0.0, 0, 0, sel["group"])
    dense = dense_attention(cpu.q, cpu.k, cpu.v, cpu.valid, cpu.lengths, cpu.bias)
    assert torch.allclose(full.float().cpu(), dense.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batched", [False, True])
def test_write_rows_into_pinned_host_memory(dtype, batched):
    gen = torch.Generator().manual_seed(1)
    b, hkv, cap, d, t = 2, 3, 50, 128, 7
    src = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    pos = (torch.stack([torch.randperm(cap, generator=gen)[:t] for _ in range(b)]) if batched
           else torch.randperm(cap, generator=gen)[:t])
    want = torch.randn(b, hkv, cap, d, generator=gen).to(dtype)
    host = want.clone().pin_memory()
    dev = want.clone().to(CUDA)
    for dst in (host, dev):
        torch.ops.dsc.write_rows(src.to(CUDA), pos.to(CUDA), dst)  # the CUDA kernel (src on the GPU)
    torch.cuda.synchronize()
    for i in range(b):
        want[i].index_copy_(1, pos[i] if batched else pos, src[i])
    assert torch.equal(host, want) and torch.equal(dev.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hsel", [2, 8])
def test_zero_copy_attention_over_pinned_host_kv_equals_on_device(dtype, hsel):
    gen = torch.Generator().manual_seed(2)
    b, hq, hkv, s, d, kk = 2, 8, 2, 3000, 128, 190
    q = torch.randn(b, hq, 1, d, generator=gen).to(dtype).to(CUDA)
    k = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(s, generator=gen)[:kk] for _ in range(b * hsel)]).view(b, hsel, 1, kk)
    idx[0, 0, 0, :5] = -1
    bias = torch.randn(b, 1, 1, s, generator=gen).to(CUDA)
    got = torch.ops.dsc.sparse_attention_host(q, k.pin_memory(), v.pin_memory(), idx.to(CUDA), 0.1, bias)
    want = T.sparse_attention(q, k.to(CUDA), v.to(CUDA), idx.to(CUDA), 0.1, bias)
    assert got.is_cuda and torch.equal(got, want)
    oracle = R.sparse_attention(q.cpu(), k, v, idx, 0.1, bias.cpu())
    assert torch.allclose(got.float().cpu(), oracle.float(), atol=TOL[dtype], rtol=TOL[dtype])
    with pytest.raises(ValueError, match="pinned host tensor"):
        torch.ops.dsc.sparse_attention_host(q, k, v, idx.to(CUDA), 0.1, bias)


@pytest.mark.parametrize("s", [1000, 131072])
def test_compiled_fused_select_is_a_valid_selection(s):
    """The opt-in select kernel (DSC_TRITON_SELECT=1) compiled, on a short and a long row, against the rule."""
    gen = torch.Generator().manual_seed(s)
    sc = torch.randn(2, 8, 1, s, generator=gen)
    sc[0, :, :, s // 3:] = float("-inf")
    sc[1, 0, 0, 5] = float("nan")
    idx = T.select(sc.to(CUDA).contiguous(), 36, 1 / 16, 4, 16)
    assert idx.is_cuda
    assert_valid_selection(sc, idx.cpu(), 36, 1 / 16, 4, 16)


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture
def models():
    return tiny("llama").to(CUDA)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_backend_with_inductor_exact_at_full_budget_on_gpu(models, cache, clean_dynamo):
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(0)).to(CUDA)
    ref = generate(models, ids, 6, cache, disable_compile=True)
    with compiled_tiny(models, inner="inductor", budget=4096):
        out = generate(models, ids, 6, cache, disable_compile=True)
    assert_same(ref, out, atol=1e-4)


@pytest.mark.parametrize("zero_copy", [True, False])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_offload_on_gpu_equals_on_device_decode(models, cache, zero_copy, monkeypatch, clean_dynamo):
    ids, mask = (t.to(CUDA) for t in padded_batch())
    # eager inner: the ops run the CUDA paths and compiles stay short
    _, _, stats = decode_both_ways(models, ids, mask, cache, "group", monkeypatch, atol=1e-4,
                                   options={"zero_copy": zero_copy}, disable_compile=True)
    assert stats["offload_fetches"] > 0 and stats["h2d_bytes"] > 0


def test_dense_decode_under_cuda_graphs_on_gpu_equals_eager(models, clean_dynamo):
    """``bench decode --compile cudagraphs``, the GPU's dense baseline: graph replays give the eager decode's logits,
    and inductor really recorded graphs (none skipped)."""
    from torch._dynamo.utils import counters

    from dsc.bench.decode import compiled_forward
    from dsc.generation import greedy_decode

    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = greedy_decode(models, ids, 6, keep_logits=True)
    skips = counters["inductor"]["cudagraph_skips"]
    out = greedy_decode(models, ids, 6, forward=compiled_forward(models, "cudagraphs"), keep_logits=True)
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert torch.equal(ref.tokens, out.tokens)
    for a, b in zip(ref.logits, out.logits):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


def test_dsparse_decode_under_cuda_graphs_on_gpu_equals_plain_decode(models, clean_dynamo):
    """``cuda_graphs=True`` (item 5 of issue 14): inductor records the static-cache decode step and its replays give
    the tokens of the same backend without graphs; then a second prompt is prefilled eagerly into the same cache
    (the recorded graphs' buffers), and the replays relabel its prefix on the device (``dsc::label_sync``) and
    still match. The CPU emulation of this is tests/test_graph_replay.py."""
    from torch._dynamo.utils import counters

    from dsc.bench.decode import compiled_forward
    from dsc.generation import Prefilled, _rewind, greedy_decode, prefill

    opts = dict(channels=CHANNELS, r=8, dense_layers=(0,), budget=6, sink=1, recent=2)
    gen = torch.Generator().manual_seed(0)
    ids_a, ids_b = (torch.randint(3, 128, (2, n), generator=gen).to(CUDA) for n in (40, 24))
    plain = compiled_forward(models, "inductor", "dsparse", opts)
    want_a = greedy_decode(models, ids_a, 8, forward=plain, keep_logits=True)
    want_b = greedy_decode(models, ids_b, 8, forward=plain, keep_logits=True)
    skips = counters["inductor"]["cudagraph_skips"]
    with pytest.warns(RuntimeWarning, match="experimental"):
        graphed = compiled_forward(models, "cudagraphs", "dsparse", opts)
        done = prefill(models, ids_a, 16)
        got_a = greedy_decode(models, ids_a, 8, forward=graphed, keep_logits=True, prefilled=done)
    with torch.no_grad():  # prompt B into the same cache, outside the compiled model
        _rewind(done.cache, 0)
        logits = models(input_ids=ids_b, cache=done.cache, cache_position=torch.arange(24, device=CUDA)).logits
    done_b = Prefilled(done.cache, logits[:, -1], 24, 0.0)
    got_b = greedy_decode(models, ids_b, 8, forward=graphed, keep_logits=True, prefilled=done_b)
    assert counters["inductor"]["cudagraph_skips"] == skips
    for want, got in ((want_a, got_a), (want_b, got_b)):
        assert torch.equal(want.tokens, got.tokens)
        for a, b in zip(want.logits, got.logits):
            assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
    assert graphed.dsparse_runtime.labels.device_rebuilds() > 0


def test_cli_bench_decode_on_gpu_random_weights_every_compiler(tmp_path):
    """The GPU end-to-end benchmark's path on a small shape: dense and dsparse eager / cudagraphs / inductor rows from
    a config.json alone, timed on the device."""
    import json

    from dsc.cli import main
    from helpers import config_only

    path = tmp_path / "g.json"
    assert main(["bench", "decode", "--device", "cuda", "--model", str(config_only(tmp_path / "shape")),
                 "--random-weights", "--dtype", "bfloat16", "--contexts", "512", "--batch", "2", "--compile",
                 "eager,cudagraphs,inductor", "--policy", "dense,dsparse", "--budget", "32", "--steps", "3",
                 "--warmup", "2", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert [(r["compile"], r["policy"]) for r in res["results"]] == [
        ("eager", "dense"), ("eager", "dsparse"), ("cudagraphs", "dense"), ("cudagraphs", "dsparse"),
        ("inductor", "dense"), ("inductor", "dsparse")]
    assert all(r["tok_per_s"] > 0 for r in res["results"]) and res["machine"]["gpu"]
