"""Regressions of issue 12: inputs that once gave wrong output with no error. Each case is now exact, refused
with a message saying what to do, or dense with a reason."""
from __future__ import annotations

import pytest
import torch
import transformers as T

import dsc
from dsc.calibration.config import ChannelConfig
from helpers import CHANNELS, HKV, LAYERS, generate, tiny
from helpers import compiled_tiny as compiled

pytestmark = pytest.mark.usefixtures("clean_dynamo")

BINDING = dict(budget=6, sink=1, recent=2)  # 6 of 12+ tokens: selection matters


def test_offload_static_cache_with_beam_search_is_refused():
    """Case 2: beam search reorders a static cache outside the model, materialising the offload placeholders as
    zeros; attending them would be silently wrong, so it is refused with what to do instead."""
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(8))
    with compiled(model, offload=True, budget=512, sink=1, recent=2):
        with pytest.raises(ValueError, match="beam search"):
            generate(model, ids, 4, "static", num_beams=2)


def test_offload_static_cache_past_max_cache_len_is_an_error():
    """Case 3: the offloaded static cache's dropped write was the plain model's bounds check; it is kept."""
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(9))
    with compiled(model, offload=True, dense_layers=(), **BINDING):
        cache = T.StaticCache(config=model.config, max_cache_len=14)
        with pytest.raises(IndexError, match="max_cache_len"):
            generate(model, ids, 6, "dynamic", past_key_values=cache)


def _greedy(forward, ids, cache, start, n):
    """Greedy tokens from a prefill of ``ids`` at ``start`` (None: no prefill here) and ``n`` decode steps."""
    out = []
    with torch.no_grad():
        logits = forward(input_ids=ids, past_key_values=cache,
                         cache_position=torch.arange(start, start + ids.shape[1])).logits
        pos = start + ids.shape[1]
        for _ in range(n):
            tok = logits[:, -1:].argmax(-1)
            out.append(int(tok))
            logits = forward(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([pos])).logits
            pos += 1
    return out, logits


@pytest.mark.parametrize("device_sync", [False, True])
def test_static_cache_written_outside_the_compiled_model_relabels(device_sync):
    """Case 4: a reused static cache prefilled eagerly (outside the compiled graph, as after a Dynamo fallback, or
    HF's generate, whose prefill is not compiled) must not decode with the previous sequence's labels: the step
    that does not continue the last one is checked against the cache and the labels are rebuilt: on the host, or
    (``device_sync``, a GPU's path) on the device by ``dsc::label_sync``."""
    model = tiny("llama")
    gen = torch.Generator().manual_seed(12)
    seq_a, seq_b = torch.randint(3, 128, (1, 30), generator=gen), torch.randint(3, 128, (1, 12), generator=gen)
    eager = model.forward
    with compiled(model, device_sync=device_sync, **BINDING) as rt:
        fresh = T.StaticCache(config=model.config, max_cache_len=64)
        want_tokens, want_logits = _greedy(model.forward, seq_b, fresh, 0, 5)

        cache = T.StaticCache(config=model.config, max_cache_len=64)
        _greedy(model.forward, seq_a, cache, 0, 5)  # sequence A through the compiled model: labels of A
        cache.reset()
        with torch.no_grad():  # sequence B's prefill outside the compiled model: the labels never see it
            first = eager(input_ids=seq_b, past_key_values=cache, cache_position=torch.arange(12)).logits
        assert rt.stats["label_rebuilds"] == 0  # both compiled sequences continued their labels
        tokens, logits = _greedy(model.forward, first[:, -1:].argmax(-1), cache, 12, 4)
    if device_sync:  # per batch row and KV head
        assert rt.stats["label_rebuilds"] == 0 and rt.labels.device_rebuilds() == (LAYERS - 1) * HKV
    else:
        assert rt.stats["label_rebuilds"] == LAYERS - 1  # B's first compiled step, once per sparse layer
    assert tokens == want_tokens[1:]
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device_sync", [False, True])
def test_reused_static_cache_whose_new_prompt_ends_where_the_last_sequence_stopped_relabels(device_sync):
    """Case 4, the coincidence: the eagerly prefilled new prompt is exactly as long as the previous sequence was,
    so its first compiled step writes the position the labels expect next; the row before it is still checked,
    found stale and the labels rebuilt (once trusted without a look)."""
    model = tiny("llama")
    gen = torch.Generator().manual_seed(13)
    seq_a, seq_b = torch.randint(3, 128, (1, 20), generator=gen), torch.randint(3, 128, (1, 25), generator=gen)
    eager = model.forward
    with compiled(model, device_sync=device_sync, **BINDING) as rt:
        want_tokens, want_logits = _greedy(model.forward, seq_b, T.StaticCache(config=model.config, max_cache_len=64),
                                           0, 5)
        cache = T.StaticCache(config=model.config, max_cache_len=64)
        _greedy(model.forward, seq_a, cache, 0, 5)  # A: prompt 20 + 5 decode writes: the next position is 25
        cache.reset()
        with torch.no_grad():
            first = eager(input_ids=seq_b, past_key_values=cache, cache_position=torch.arange(25)).logits
        tokens, logits = _greedy(model.forward, first[:, -1:].argmax(-1), cache, 25, 4)
    assert tokens == want_tokens[1:]
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    rebuilds = rt.labels.device_rebuilds() if device_sync else rt.stats["label_rebuilds"]
    assert rebuilds == (LAYERS - 1) * (HKV if device_sync else 1)


# ------------------------------------------------------------------------------------------------ case 5
def _ten_models(compile_one):
    """Sparse decode calls of each of 10 tiny models (each with its own channel config) compiled in turn, under
    Dynamo's default recompile limit (0 for a model that ran uncompiled: its options never reached a backend)."""
    from helpers import HKV, HQ, D

    calls = []
    with torch._dynamo.config.patch(recompile_limit=8):  # Dynamo's default (the autouse fixture raises it)
        for i in range(10):
            model = tiny("llama")
            options = {"channels": ChannelConfig.random(LAYERS, HQ, HKV, D, seed=100 + i), "inner": "eager",
                       "dense_layers": (0,), "r": 8, "budget": 256}
            compile_one(model, options)
            generate(model, torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(i)), 3)
            rt = dsc.runtime_of(model) or dsc.runtime_of(options)  # dsc.compile's, or model.compile(options=)'s
            calls.append(rt.stats["sparse_calls"] if rt is not None else 0)
    return calls


def test_ten_models_in_one_process_each_stay_sparse_with_dsc_compile():
    """Case 5: HF models of one class share one forward code object, hence Dynamo's recompile limit; dsc.compile
    gives each model its own, so the 10th model is as sparse as the first."""
    calls = _ten_models(lambda model, options: dsc.compile(model, **options))
    assert calls == [4] * 10, calls


def test_hitting_the_recompile_limit_warns_that_the_model_runs_dense():
    """Case 5 with plain ``model.compile``: past the shared limit later models run uncompiled; the user is told."""
    with pytest.warns(RuntimeWarning, match="recompile limit.*WITHOUT the dsparse backend"):
        calls = _ten_models(lambda model, options: model.compile(backend="dsparse", options=options))
    assert 0 in calls  # what the warning is about: some model decoded densely


# ------------------------------------------------------------------------------------------------ cases 7, 8
def test_layer_index_takes_the_outermost_container():
    """Case 7: T5 numbers sub-layers inside each block (``block.3.layer.1``): the block is the decoder layer."""
    from dsc.sites import layer_index

    assert layer_index("decoder.block.3.layer.1.EncDecAttention") == 3
    assert layer_index("L['self'].decoder.block[2].layer[0].SelfAttention") == 2
    assert layer_index("model.layers.7.self_attn") == 7
    assert layer_index("lm_head") is None


def _encoder_decoder(kind):
    if kind == "bart":
        cfg = T.BartConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0,
                           eos_token_id=2, decoder_start_token_id=0)
        cls = T.BartForConditionalGeneration
    else:
        cfg = T.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                         num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
        cls = T.T5ForConditionalGeneration
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_cross_attention_stays_dense_and_layers_are_named_by_block(kind):
    """Case 8: cross-attention K is ``cat(empty, encoder keys)`` at the first step, which looks like a dynamic
    cache; it must stay dense (its keys are not the decoder's tokens). Case 7: self- and cross-attention of one
    block carry the block's layer number."""
    model = _encoder_decoder(kind)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    backend = dsc.sparse_backend(channels=ChannelConfig.random(2, 4, 4, 16, seed=1), inner="eager", dense_layers=(),
                                 r=4, budget=3, sink=0, recent=1)
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    del model.forward
    sites = [s for rep in backend.runtime.reports for s in rep]
    cross = [s for s in sites if "encoder_attn" in s.module_path or "EncDecAttention" in s.module_path]
    own = [s for s in sites if s not in cross]
    assert cross and all(s.action == "dense" for s in cross), [(s.module_path, s.reason) for s in cross]
    assert any("cross-attention" in s.reason for s in cross)
    assert own and all(s.action == "sparse" for s in own)
    assert {s.layer for s in cross} == {s.layer for s in own} == {0, 1}
    # budget 3 binds on the decoder's self-attention only from its 4th token; the first steps are exact
    assert out[0, :4].tolist() == ref[0, :4].tolist()


# ------------------------------------------------------------------------------------------------ case 9
@pytest.mark.parametrize("sizes, what", [((3, 4, 1, 16), "num_kv_heads"), ((3, 8, 2, 16), "num_heads"),
                                         ((2, 4, 2, 16), "num_layers")])
def test_channel_config_for_another_model_is_refused(sizes, what):
    """Case 9: fewer KV heads were silently repeated, other head or layer counts accepted."""
    model = tiny("llama")
    wrong = ChannelConfig.random(*sizes, seed=4, layers=[1])
    with compiled(model, channels=wrong, **BINDING):
        with pytest.raises(Exception, match=what):
            generate(model, torch.randint(3, 128, (1, 10)), 2)


def test_dsc_compile_checks_the_weight_fingerprint():
    """Case 9, weights: a config calibrated on another checkpoint of the same shape is refused by dsc.compile,
    unless the user opts out."""
    import dataclasses

    from dsc.calibration.config import model_fingerprint

    model, other = tiny("llama"), tiny("llama", rope_theta=5000.0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    cfg = dataclasses.replace(CHANNELS, fingerprint=model_fingerprint(other))
    with pytest.raises(ValueError, match="other weights.*check_fingerprint=False"):
        dsc.compile(model, channels=cfg, inner="eager")
    dsc.compile(model, channels=cfg, inner="eager", check_fingerprint=False)
    assert generate(model, torch.randint(3, 128, (1, 10)), 2).sequences.shape == (1, 12)


def test_offloaded_cache_read_by_the_plain_model_gives_nan_not_garbage():
    """Hygiene: an offloaded cache handed back to the user holds placeholders; continuing with the plain
    (uncompiled) model must not look plausible: it yields NaN."""
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(13))
    eager = model.forward
    with compiled(model, offload=True, **BINDING):
        cache = T.DynamicCache(config=model.config)
        generate(model, ids, 3, "dynamic", past_key_values=cache)
    n = cache.get_seq_length()
    with torch.no_grad():
        logits = eager(input_ids=ids[:, :1], past_key_values=cache, cache_position=torch.arange(n, n + 1)).logits
    assert logits.isnan().all()
