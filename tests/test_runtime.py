"""The run-time state has one owner: each compiled model's :class:`dsc.passes.runtime.Runtime`. Compiling and
resetting leaves nothing behind (no site, spec, report or label entry); two models compiled in one process keep
separate counters; offload runs under inductor too."""
from __future__ import annotations

import gc

import pytest
import torch
import transformers as T

import dsc
from dsc.calibration.config import ChannelConfig
from dsc.passes.runtime import live_runtimes
from helpers import HKV, HQ, D, assert_same, generate, tiny_decoder

LAYERS = 3
CHANNELS = ChannelConfig.random(LAYERS, HQ, HKV, D, seed=1)
OPTIONS = dict(channels=CHANNELS, inner="eager", dense_layers=(0,), r=8, budget=6, sink=1, recent=2)


def _model():
    return tiny_decoder(T.LlamaConfig, T.LlamaForCausalLM, LAYERS)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiling_and_resetting_ten_times_leaves_nothing_behind():
    model = _model()
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    gc.collect()
    before = {id(r) for r in live_runtimes()}
    for _ in range(10):  # the string backend: the runtime lives as long as a graph it compiled
        forward = torch.compile(model.forward, backend="dsparse", options=dict(OPTIONS))
        model.forward = forward
        out = generate(model, ids, 2, "static")
        del model.forward
        torch._dynamo.reset()
    del forward, out
    gc.collect()
    assert [r for r in live_runtimes() if id(r) not in before] == []
    for _ in range(3):  # dsc.compile: the model owns its (latest) runtime
        dsc.compile(model, check_fingerprint=False, **OPTIONS)
        generate(model, ids, 3, "static")
        torch._dynamo.reset()
    gc.collect()
    rt = model.dsparse_runtime
    assert [r for r in live_runtimes() if id(r) not in before] == [rt]
    counts = rt.counts()
    # one site per sparse layer (recompiled graphs reuse them), one label spec each; caches freed with generate's
    assert counts["sites"] == LAYERS - 1 and counts["label_specs"] == LAYERS - 1, counts
    assert counts["entries"] == 0 and counts["predictions"] == 0, counts
    assert rt.stats["sparse_calls"] == 2 * (LAYERS - 1) and rt.stats["entries_freed"] > 0


def test_two_models_keep_separate_counters():
    a, b = _model(), _model()
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    dsc.compile(a, check_fingerprint=False, **OPTIONS)
    dsc.compile(b, check_fingerprint=False, **OPTIONS)
    generate(a, ids, 4, "static")
    generate(b, ids, 2, "static")
    assert a.dsparse_runtime is not b.dsparse_runtime
    assert a.dsparse_runtime.stats["sparse_calls"] == 3 * (LAYERS - 1)
    assert b.dsparse_runtime.stats["sparse_calls"] == 1 * (LAYERS - 1)


def test_offload_under_inductor_equals_on_device_decode():
    """The offload strategy inside an inductor-compiled graph (the placeholders, the host store, the op's
    ordering) decodes the same tokens as on-device Double Sparsity at a budget that drops tokens."""
    model = _model()
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(2))
    opts = dict(OPTIONS, gqa="group")
    dsc.compile(model, check_fingerprint=False, **opts)
    ref = generate(model, ids, 4, "static")
    torch._dynamo.reset()
    dsc.compile(model, check_fingerprint=False, **dict(opts, inner="inductor", offload=True))
    out = generate(model, ids, 4, "static")
    assert_same(ref, out, atol=1e-4)
    stats = model.dsparse_runtime.stats
    assert stats["offload_fetches"] == stats["sparse_calls"] == 3 * (LAYERS - 1)
    assert 0 < stats["h2d_bytes"] <= 3 * (LAYERS - 1) * 2 * HKV * 6 * 2 * D * 4  # at most the budget's rows


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_planned_decode_takes_the_steady_state_and_equals_the_general_path(bits, monkeypatch):
    """On the CPU with the native kernels built, every decode step of a static cache takes the site's plan (the
    prefill left each label cache continuing at the next position), and it decodes the same tokens and logits, bit
    for bit, as the general path (plans refused) at a budget that drops tokens. A plan the native kernel declines
    is kept as declined (one per site) and every step takes the general path (here the torch kernels)."""
    from dsc.kernels import native
    from dsc.passes import site_op

    if native.library() is None:
        pytest.skip("no native CPU kernel on this machine")
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    planned, real = [], site_op._ds_decode

    def spy(*args, **kw):
        planned.append(kw.get("planned", False))
        return real(*args, **kw)

    monkeypatch.setattr(site_op, "_ds_decode", spy)
    runs = {}
    for mode in ("planned", "general", "declined"):
        with monkeypatch.context() as m:
            if mode == "general":
                m.setattr(site_op, "planned_decode", lambda *a: None)
            if mode == "declined":
                m.setattr(native, "covers", lambda *a: False)
            planned.clear()
            model = _model()
            dsc.compile(model, check_fingerprint=False, **dict(OPTIONS, label_bits=bits))
            runs[mode] = generate(model, ids, 5, "static")
            rt = model.dsparse_runtime
            assert len(planned) == rt.stats["sparse_calls"] == 4 * (LAYERS - 1)
            assert all(planned) if mode == "planned" else not any(planned)
            assert rt.counts()["plans"] == (0 if mode == "general" else LAYERS - 1)
            torch._dynamo.reset()
    assert runs["planned"].sequences.tolist() == runs["general"].sequences.tolist()
    for a, b in zip(runs["planned"].logits, runs["general"].logits):
        assert torch.equal(a, b)
    assert_same(runs["planned"], runs["declined"], atol=1e-5)
    assert not torch.equal(runs["planned"].logits[-1], generate(_model(), ids, 5, "static").logits[-1])  # binds
