"""Channel calibration on small synthetic and random models (fast): ChannelConfig contract, statistics, RoPE
layout detection, reference interchange, CLI and the cached default config."""
from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dsc.calibration.config import ChannelConfig, pair_share, rank_channels, rope_partner, topk_overlap
from dsc.calibration.interchange import borda_merge, export_reference, import_reference
from dsc.calibration.stats import calibrate, collect_stats, token_blocks


# ----------------------------------------------------------------------------------------------- toy models
def _rope(x: torch.Tensor, layout: str, theta: float = 100.0) -> torch.Tensor:
    """RoPE on [B, H, L, D] in either channel layout (independent of HF's implementation)."""
    b, h, n, d = x.shape
    inv = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]  # [L, D/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    if layout == "rotate_half":
        a, c = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * cos - c * sin, a * sin + c * cos], dim=-1)
    a, c = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - c * sin, a * sin + c * cos], dim=-1).reshape(b, h, n, d)


class ToyAttention(nn.Module):
    def __init__(self, emb, hq, hkv, d, planted, repeat_kv=False, rope=None, gain=12.0):
        super().__init__()
        self.hq, self.hkv, self.d, self.repeat, self.rope = hq, hkv, d, repeat_kv, rope
        self.wq, self.wk, self.wv = nn.Linear(emb, hq * d), nn.Linear(emb, hkv * d), nn.Linear(emb, hkv * d)
        self.wo = nn.Linear(hq * d, emb)
        with torch.no_grad():
            for lin in (self.wq, self.wk, self.wv, self.wo):
                lin.weight.mul_(0.3)
            g = hq // hkv
            for kv, chans in enumerate(planted):  # amplify the planted channels of each KV head and its queries
                for c in chans:
                    self.wk.weight[kv * d + c] *= gain
                    for h in range(kv * g, (kv + 1) * g):
                        self.wq.weight[h * d + c] *= gain

    def forward(self, x):
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.hq, self.d).transpose(1, 2)
        k = self.wk(x).view(b, n, self.hkv, self.d).transpose(1, 2)
        v = self.wv(x).view(b, n, self.hkv, self.d).transpose(1, 2)
        if self.rope:
            q, k = _rope(q, self.rope), _rope(k, self.rope)
        if self.repeat:
            g = self.hq // self.hkv
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(b, n, -1))


class ToyModel(nn.Module):
    """A decoder-shaped model with attention in ``layers.N.attn``; no HF code involved."""

    def __init__(self, planted_per_layer, hq=4, hkv=2, d=16, emb=32, vocab=50, repeat_kv=False, rope=None,
                 with_config=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, emb)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"attn": ToyAttention(emb, hq, hkv, d, p, repeat_kv, rope)}) for p in planted_per_layer)
        if with_config:
            self.config = types.SimpleNamespace(num_hidden_layers=len(planted_per_layer), num_attention_heads=hq,
                                                num_key_value_heads=hkv, head_dim=d)

    def forward(self, input_ids, **kwargs):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = x + layer["attn"](x)
        return x


def tiny_llama(layers=2, hq=4, hkv=2, d=16, vocab=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hq * d, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d, max_position_embeddings=512,
                      rope_theta=1000.0)
    return LlamaForCausalLM(cfg).eval()


# --------------------------------------------------------------------------------------------- ChannelConfig
dims = st.tuples(st.integers(1, 4), st.integers(1, 3), st.sampled_from([2, 4, 8, 16])).map(
    lambda t: (t[0], t[1] * t[0], t[2]))  # (hkv, hq, d)


@given(dims=dims, n_layers=st.integers(1, 5), seed=st.integers(0, 10**6), pair=st.booleans(),
       layout=st.sampled_from(["rotate_half", "interleaved"]), data=st.data())
def test_config_save_load_roundtrip(tmp_path_factory, dims, n_layers, seed, pair, layout, data):
    hkv, hq, d = dims
    layers = data.draw(st.lists(st.integers(0, n_layers - 1), min_size=1, unique=True))
    cfg = ChannelConfig.random(n_layers, hq, hkv, d, seed=seed, layers=layers, pair_aware=pair, rope_layout=layout)
    path = tmp_path_factory.mktemp("cfg") / "c.json"
    cfg.save(path)
    back = ChannelConfig.load(path)
    assert back == cfg and back.layers == sorted(layers)
    for layer in range(n_layers):
        assert back.has_layer(layer) == (layer in layers)
    r = data.draw(st.integers(1, d).filter(lambda x: not pair or x % 2 == 0))
    ch = back.channels(layers[0], r)
    assert ch.dtype == torch.int64 and ch.shape == (hkv, r)
    assert torch.equal(ch, torch.sort(back.rankings[layers[0]][:, :r], dim=1).values)
    if pair:  # whole RoPE pairs
        for row in ch.tolist():
            assert all(rope_partner(c, d, layout) in row for c in row)


def test_channels_errors_name_the_problem():
    cfg = ChannelConfig.random(4, 8, 2, 16, layers=[2, 3])
    with pytest.raises(ValueError, match="layer 0 is not in this channel config.*2..3"):
        cfg.channels(0, 4)
    with pytest.raises(ValueError, match="r .* 1..head_dim=16"):
        cfg.channels(2, 17)
    with pytest.raises(ValueError, match="odd.*pair_aware"):
        ChannelConfig.random(4, 8, 2, 16, pair_aware=True).channels(1, 3)


def test_config_validation():
    good = torch.arange(8).repeat(2, 1)
    ChannelConfig.from_rankings({0: good}, num_heads=4)
    with pytest.raises(ValueError, match=r"shape \(2, 7\).*\[2, 8\]"):
        ChannelConfig(rankings={0: good[:, :7]}, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
    bad = good.clone()
    bad[1, 0] = 1
    with pytest.raises(ValueError, match=r"rankings\[0\]\[1\] is not a permutation"):
        ChannelConfig.from_rankings({0: bad})
    with pytest.raises(ValueError, match="layer 5, outside 0..1"):
        ChannelConfig.from_rankings({5: good}, num_layers=2)
    with pytest.raises(ValueError, match="integer channel ids"):
        ChannelConfig.from_rankings({0: good.float()})
    with pytest.raises(ValueError, match="not rotate_half RoPE partners"):
        ChannelConfig.from_rankings({0: good}, pair_aware=True)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ChannelConfig.from_rankings({0: good}, num_heads=3)
    with pytest.raises(ValueError, match="unknown ChannelConfig fields"):
        ChannelConfig.from_rankings({0: good}, colour="red")
    with pytest.raises(ValueError, match="rope_layout"):
        ChannelConfig.from_rankings({0: good}, rope_layout="sideways")


def test_check_shapes_and_model_name_both_sides():
    cfg = ChannelConfig.random(30, 9, 3, 64)
    cfg.check_shapes(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    with pytest.raises(ValueError, match="num_kv_heads: config 3 vs the model 4; head_dim: config 64 vs the model 128"):
        cfg.check_shapes(num_kv_heads=4, head_dim=128)
    other = tiny_llama(layers=2, hq=4, hkv=2, d=16)
    with pytest.raises(ValueError, match="calibrated for a model with num_layers=30, num_heads=9, num_kv_heads=3, "
                                         "head_dim=64; this model has num_layers=2, num_heads=4, num_kv_heads=2, "
                                         "head_dim=16. Calibrate this model: `dsc calibrate"):
        cfg.check_model(other)
    with pytest.raises(ValueError, match="num_heads=9.*num_heads=4"):
        cfg.check_model(other.config)
    mine = ChannelConfig.for_model(other, {0: torch.arange(16).repeat(2, 1)})
    mine.check_model(other)
    stranger = tiny_llama(layers=2, hq=4, hkv=2, d=16, seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match=r"other weights.*Calibrate this model.*check_model\(\.\.\., fingerprint=False\)"):
        mine.check_model(stranger)
    mine.check_model(stranger, fingerprint=False)  # the documented opt-out: shapes only


SIZES = dict(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)


@pytest.mark.parametrize("field,value", [("num_layers", 32), ("num_layers", 2), ("num_heads", 18),
                                         ("num_heads", 3), ("num_kv_heads", 1), ("num_kv_heads", 9),
                                         ("head_dim", 128), ("head_dim", 32)])
def test_check_match_refuses_every_other_size(field, value):
    """Issue 12 item 9: fewer KV heads (once silently repeated), other num_heads or num_layers are refused too."""
    cfg = ChannelConfig.random(**SIZES)
    cfg.check_match(**SIZES)
    with pytest.raises(ValueError) as e:
        cfg.check_match(**dict(SIZES, **{field: value}), what="the model at model.layers.5")
    msg = str(e.value)
    assert f"calibrated for a model with {field}={SIZES[field]}; the model at model.layers.5 has {field}={value}" in msg
    assert "Calibrate this model: `dsc calibrate --model" in msg
    assert [k for k in SIZES if f"{k}=" in msg] == [field]  # names only what differs
    with pytest.raises(TypeError):  # every size is required
        cfg.check_match(num_layers=30, num_heads=9, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim must be an int"):
        cfg.check_match(**dict(SIZES, head_dim="64"))


def test_check_match_fingerprint_and_opt_out():
    cfg = ChannelConfig.from_dict(dict(ChannelConfig.random(**SIZES).to_dict(), fingerprint="sha256-v2:aaaa"))
    cfg.check_match(**SIZES, fingerprint="sha256-v2:aaaa")
    cfg.check_match(**SIZES)  # fingerprint=None: the opt-out, shapes only
    with pytest.raises(ValueError, match=r"fingerprint sha256-v2:aaaa\); this model has fingerprint sha256-v2:bbbb.*"
                                         r"skip the weight check with check_match\(\.\.\., fingerprint=None\)"):
        cfg.check_match(**SIZES, fingerprint="sha256-v2:bbbb")
    with pytest.raises(ValueError, match=r"skip the weight check with options\['check_fingerprint'\]=False"):
        cfg.check_match(**SIZES, fingerprint="sha256-v2:bbbb", skip_hint="options['check_fingerprint']=False")
    with pytest.raises(ValueError, match="num_kv_heads"):  # shapes are checked before weights
        cfg.check_match(**dict(SIZES, num_kv_heads=1), fingerprint="sha256-v2:aaaa")
    imported = ChannelConfig.random(**SIZES)  # no fingerprint recorded (e.g. an imported reference config)
    assert imported.fingerprint is None
    imported.check_match(**SIZES, fingerprint="sha256-v2:bbbb")
    # a config saved by a dsc whose fingerprints hashed every weight: not comparable, so a warning, not a refusal
    older = ChannelConfig.from_dict(dict(cfg.to_dict(), fingerprint="sha256:aaaa"))
    with pytest.warns(UserWarning, match="computed by another dsc version.*weights not checked"):
        older.check_match(**SIZES, fingerprint="sha256-v2:bbbb")
    with pytest.raises(ValueError, match="num_heads"):
        older.check_match(**dict(SIZES, num_heads=3), fingerprint="sha256-v2:bbbb")


def test_json_errors_are_clear(tmp_path):
    cfg = ChannelConfig.random(3, 4, 2, 8)
    path = cfg.save(tmp_path / "c.json")
    text = path.read_text()
    # a directory: say so, and what to pass
    with pytest.raises(FileNotFoundError, match=r"is a directory holding c\.json, not a file; pass the JSON file"):
        ChannelConfig.load(tmp_path)
    # deep nesting: a ValueError, not a RecursionError
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        ChannelConfig.load(deep)
    deep.write_text('{"rankings": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nested too deeply"):
        import_reference(deep)
    # duplicate layer keys: "1" and "01" name one layer; an exact repeat is refused by the JSON reader
    obj = json.loads(text)
    rows = obj["rankings"]["1"]
    dup = tmp_path / "dup.json"
    dup.write_text(text.replace('"1": [', '"01": ' + json.dumps(rows) + ',\n   "1": [', 1))
    assert '"01"' in dup.read_text()
    with pytest.raises(ValueError, match="names layer 1 twice \\(keys '01' and '1'\\)"):
        ChannelConfig.load(dup)
    dup.write_text(text.replace('"1": [', '"1": ' + json.dumps(rows) + ',\n   "1": [', 1))
    with pytest.raises(ValueError, match="repeats the key '1' within one object"):
        ChannelConfig.load(dup)
    dup.write_text(text.replace('"tokens": 0,', '"tokens": 0, "tokens": 5,', 1))
    with pytest.raises(ValueError, match="repeats the key 'tokens'"):
        ChannelConfig.load(dup)
    with pytest.raises(ValueError, match="names layer 1 twice"):
        ChannelConfig(rankings={1: cfg.rankings[1], "1": cfg.rankings[1]}, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    ref = export_reference(cfg)
    key = next(iter(ref))
    ref[key.replace("layers.0.", "layers.00.")] = ref[key]
    with pytest.raises(ValueError, match="names layer 0's qk rows twice"):
        import_reference(ref, num_heads=4, num_kv_heads=2)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        import_reference(tmp_path)


def test_saves_are_atomic_and_ordinary_files(tmp_path, monkeypatch):
    """ChannelConfig.save and save_reference write a temp file in the same folder and os.replace it: a failure
    leaves the previous file whole and no temp file behind."""
    import stat

    from dsc.calibration import config as config_mod
    from dsc.calibration.interchange import save_reference

    a, b = ChannelConfig.random(3, 4, 2, 8, seed=1), ChannelConfig.random(3, 4, 2, 8, seed=2)
    old = os.umask(0o022)
    try:
        p1 = a.save(tmp_path / "c.json")
        p2 = save_reference(a, tmp_path / "sub" / "r.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p1.stat().st_mode) == 0o644 and stat.S_IMODE(p2.stat().st_mode) == 0o644
    before = (p1.read_text(), p2.read_text())
    seen = []

    def failing_replace(src, dst):
        seen.append((Path(src).parent, Path(dst)))
        raise OSError("disk full")

    monkeypatch.setattr(config_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        b.save(p1)
    with pytest.raises(OSError, match="disk full"):
        save_reference(b, p2)
    monkeypatch.undo()
    assert seen == [(tmp_path, p1), (tmp_path / "sub", p2)]  # the temp file was beside the target
    assert (p1.read_text(), p2.read_text()) == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["c.json", "r.json"]
    assert ChannelConfig.load(b.save(p1)) == b and import_reference(save_reference(b, p2), num_heads=4,
                                                                     num_kv_heads=2) == b.__class__.from_dict(
        dict(b.to_dict(), method="imported"))


def test_load_rejects_truncated_and_malformed(tmp_path):
    cfg = ChannelConfig.random(3, 4, 2, 8)
    path = cfg.save(tmp_path / "c.json")
    text = path.read_text()
    (tmp_path / "t.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"t.json.*not valid JSON.*truncated"):
        ChannelConfig.load(tmp_path / "t.json")
    with pytest.raises(FileNotFoundError, match="dsc calibrate"):
        ChannelConfig.load(tmp_path / "missing.json")
    obj = json.loads(text)

    def write(mutate):
        o = json.loads(json.dumps(obj))
        mutate(o)
        p = tmp_path / "m.json"
        p.write_text(json.dumps(o))
        return p

    cases = [
        (lambda o: o.pop("head_dim"), r"missing fields \['head_dim'\]"),
        (lambda o: o.update(extra=1), r"unknown fields \['extra'\]"),
        (lambda o: o.update(format="other"), "not a dsc channel config"),
        (lambda o: o.update(format_version=99), "format_version 99"),
        (lambda o: o.update(head_dim=16), r"shape \(2, 8\).*\[2, 16\]"),
        (lambda o: o.update(num_kv_heads="2"), "num_kv_heads must be a positive int"),
        (lambda o: o["rankings"].update({"0": [[0.5] * 8] * 2}), "lists of int channel ids"),
        (lambda o: o["rankings"].update({"0": [[0] * 8] * 2}), "not a permutation"),
        (lambda o: o["rankings"].update({"7": obj["rankings"]["0"]}), "layer 7, outside 0..2"),
        (lambda o: o.update(rankings=[]), "'rankings' must be an object"),
    ]
    for mutate, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ChannelConfig.load(write(mutate))
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(export_reference(cfg)))
    with pytest.raises(ValueError, match="import_reference"):
        ChannelConfig.load(ref)


@given(scores=st.lists(st.floats(0, 10, allow_nan=False), min_size=8, max_size=8),
       layout=st.sampled_from(["rotate_half", "interleaved"]))
def test_rank_channels(scores, layout):
    s = torch.tensor([scores], dtype=torch.float64)
    plain = rank_channels(s)[0].tolist()
    assert [scores[c] for c in plain] == sorted(scores, reverse=True)
    paired = rank_channels(s, pair_aware=True, rope_layout=layout)[0].tolist()
    assert sorted(paired) == list(range(8))
    sums = [scores[paired[i]] + scores[paired[i + 1]] for i in range(0, 8, 2)]
    assert sums == sorted(sums, reverse=True)
    for i in range(0, 8, 2):
        assert paired[i + 1] == rope_partner(paired[i], 8, layout) and scores[paired[i]] >= scores[paired[i + 1]]


# ------------------------------------------------------------------------------------------------ interchange
@given(dims=dims, n_layers=st.integers(1, 4), seed=st.integers(0, 10**6), kind=st.sampled_from(["qk", "q", "k"]))
def test_reference_export_import_roundtrip(dims, n_layers, seed, kind):
    hkv, hq, d = dims
    cfg = ChannelConfig.random(n_layers, hq, hkv, d, seed=seed)
    ref = json.loads(json.dumps(export_reference(cfg, kind)))
    assert set(ref) == {f"model.layers.{i}.self_attn.{kind}_proj" for i in range(n_layers)}
    assert all(len(rows) == (hkv if kind == "k" else hq) for rows in ref.values())
    back = import_reference(ref, num_layers=n_layers, num_heads=hq, num_kv_heads=hkv)
    assert back.rankings.keys() == cfg.rankings.keys()
    assert all(torch.equal(back.rankings[k], cfg.rankings[k]) for k in cfg.rankings)
    assert back.method == "imported" and (back.num_heads, back.num_kv_heads, back.head_dim) == (hq, hkv, d)


@given(g=st.integers(1, 4), d=st.sampled_from([4, 8, 16]), seed=st.integers(0, 10**6))
def test_borda_merge(g, d, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(d, generator=gen) for _ in range(g)])
    merged = borda_merge(rows)
    assert sorted(merged.tolist()) == list(range(d))
    assert torch.equal(merged, borda_merge(rows.flip(0)))  # the order of a group's heads does not matter
    assert torch.equal(borda_merge(rows[:1].repeat(g, 1)), rows[0])
    pos = torch.argsort(rows, dim=1).sum(0)  # summed place of each channel
    assert pos[merged].tolist() == sorted(pos.tolist())


def test_reference_import_mapping_and_errors(tmp_path):
    # Two query heads per KV head disagreeing: channel 1 is best in sum of places.
    ref = {"model.layers.0.self_attn.qk_proj": [[0, 1, 2, 3], [1, 2, 3, 0], [3, 2, 1, 0], [3, 2, 1, 0]]}
    cfg = import_reference(ref, num_heads=4, num_kv_heads=2)
    assert cfg.rankings[0].tolist() == [[1, 0, 2, 3], [3, 2, 1, 0]]
    with pytest.raises(ValueError, match="pass num_kv_heads"):
        import_reference(ref)
    with pytest.raises(ValueError, match="4 qk rows .* num_heads=8"):
        import_reference(ref, num_heads=8, num_kv_heads=2)
    with pytest.raises(ValueError, match="not of the form"):
        import_reference({"model.layers.0.mlp": [[0]]})
    partial = {"model.layers.0.self_attn.k_proj": [[3, 1], [0, 2]]}
    with pytest.raises(ValueError, match="allow_partial"):
        import_reference(partial, head_dim=4, num_heads=2)
    cfg = import_reference(partial, head_dim=4, num_heads=2, allow_partial=True)
    assert cfg.rankings[0].tolist() == [[3, 1, 0, 2], [0, 2, 1, 3]]
    both = {**partial, "model.layers.0.self_attn.q_proj": [[0, 1, 2, 3]] * 2}
    with pytest.raises(ValueError, match="pick one with kind"):
        import_reference(both, head_dim=4, num_heads=2, num_kv_heads=2)
    p = tmp_path / "r.json"
    p.write_text(json.dumps(ref)[:-5])
    with pytest.raises(ValueError, match="r.json.*not valid JSON"):
        import_reference(p, num_heads=4, num_kv_heads=2)
    model = tiny_llama(hq=4, hkv=2, d=4)
    cfg = import_reference(ref, model=model)
    assert cfg.num_layers == 2 and cfg.layers == [0]
    cfg.check_model(model)


# ------------------------------------------------------------------------------------------------- statistics
@settings(max_examples=8)
@given(data=st.data(), hkv=st.integers(1, 2), g=st.integers(1, 3), repeat=st.booleans(),
       with_config=st.booleans())
def test_planted_channels_are_recovered(data, hkv, g, repeat, with_config):
    d, r = 16, 3
    planted = [[sorted(data.draw(st.lists(st.integers(0, d - 1), min_size=r, max_size=r, unique=True)))
                for _ in range(hkv)] for _ in range(2)]
    model = ToyModel(planted, hq=hkv * g, hkv=hkv, d=d, repeat_kv=repeat, with_config=with_config)
    ids = torch.randint(0, 50, (96,), generator=torch.Generator().manual_seed(1))
    cfg = calibrate(model, ids, tokens=None, block_size=32, progress=False)
    want_hkv = hkv if (with_config or not repeat or g == 1) else hkv * g  # repeats unknowable without a config
    assert cfg.num_kv_heads == want_hkv and cfg.num_heads == hkv * g and cfg.layers == [0, 1]
    for layer in (0, 1):
        top = cfg.channels(layer, r).tolist()
        for h, row in enumerate(top):
            assert row == planted[layer][h * hkv // want_hkv]


def test_repeated_keys_that_are_not_repeats_are_refused():
    model = ToyModel([[[0]] * 2], hq=4, hkv=4, d=8, with_config=True)
    model.config.num_key_value_heads = 2  # lies: the keys have 4 distinct heads
    with pytest.raises(ValueError, match="not repeats of 2 KV heads"):
        collect_stats(model, torch.arange(20) % 7, tokens=None, block_size=16, progress=False)


def _independent_llama_stats(model, blocks):
    """Per layer [Hkv, D] means of qk/q/k from the attention module's own projections + HF's RoPE function."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = hq // hkv
    sums = {m: torch.zeros(cfg.num_hidden_layers, hkv, d, dtype=torch.float64) for m in ("qk", "q", "k")}
    count = 0
    with torch.no_grad():
        for block in blocks:
            out = model(input_ids=block[None], output_hidden_states=True, use_cache=False)
            pos = torch.arange(block.numel())[None]
            cos, sin = model.model.rotary_emb(out.hidden_states[0], pos)
            for i, layer in enumerate(model.model.layers):
                x = layer.input_layernorm(out.hidden_states[i])
                att = layer.self_attn
                q = att.q_proj(x).view(1, -1, hq, d).transpose(1, 2)
                k = att.k_proj(x).view(1, -1, hkv, d).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                q, k = q.double(), k.double()
                for h in range(hq):
                    sums["qk"][i, h // g] += (q[0, h] * k[0, h // g]).abs().sum(0)
                    sums["q"][i, h // g] += q[0, h].abs().sum(0)
                sums["k"][i] += k[0].abs().sum(1)
            count += block.numel()
    return {m: s / count for m, s in sums.items()}


def test_statistic_equals_independent_computation_on_llama():
    model = tiny_llama(layers=2, hq=4, hkv=2, d=16)
    ids = torch.randint(0, 64, (80,), generator=torch.Generator().manual_seed(0))
    st_ = collect_stats(model, ids, tokens=None, block_size=48, progress=False)  # blocks of 48 and 32 tokens
    ref = _independent_llama_stats(model, [ids[:48], ids[48:]])
    assert st_.counts == {0: 80, 1: 80} and st_.rope_layout == "rotate_half"
    for method in ("qk", "q", "k"):
        got = torch.stack(list(st_.mean(method).values()))
        torch.testing.assert_close(got, ref[method], rtol=1e-5, atol=1e-7)


def test_statistic_averages_all_blocks():
    """Fails if a block's statistic overwrote the previous ones (the reference's bug) or blocks were unweighted."""
    model = ToyModel([[[1, 2]]], hq=2, hkv=1, d=8)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 50, (40,), generator=gen), torch.randint(0, 50, (24,), generator=gen)
    both = collect_stats(model, [a, b], tokens=None, block_size=64, progress=False)
    sa = collect_stats(model, [a], tokens=None, block_size=64, progress=False)
    sb = collect_stats(model, [b], tokens=None, block_size=64, progress=False)
    for m in ("qk", "q", "k"):
        want = (sa.mean(m)[0] * 40 + sb.mean(m)[0] * 24) / 64
        torch.testing.assert_close(both.mean(m)[0], want, rtol=1e-12, atol=0)
        assert not torch.allclose(both.mean(m)[0], sb.mean(m)[0], rtol=1e-3)
    # Planted in block a only: a last-block-only statistic would miss them.
    amp = ToyModel([[[5, 6]]], hq=2, hkv=1, d=8)
    zero = torch.zeros(24, dtype=torch.int64)
    with torch.no_grad():
        amp.embed.weight[0] = 0  # token 0 (with zero biases) gives q = k = 0: block "zero" adds nothing
        for lin in (amp.layers[0]["attn"].wq, amp.layers[0]["attn"].wk):
            lin.bias.zero_()
    cfg = calibrate(amp, [a.clamp(min=1), zero], tokens=None, block_size=64, progress=False)
    assert cfg.channels(0, 2).tolist() == [[5, 6]]
    last_only = calibrate(amp, [zero], tokens=None, block_size=64, progress=False)
    assert last_only.channels(0, 2).tolist() == [[0, 1]]  # all ties: what a last-block-only statistic would give


def test_calibrate_is_deterministic_and_caps_tokens():
    model = tiny_llama()
    ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(0))
    c1 = calibrate(model, ids, tokens=100, block_size=16, progress=False)
    c2 = calibrate(model, ids, tokens=100, block_size=16, progress=False)
    assert c1 == c2 and c1.tokens == 100 and c1.fingerprint
    c1.check_model(model)
    c3 = calibrate(model, ids.flip(-1), tokens=100, block_size=16, progress=False)
    assert c1 != c3  # other tokens, another ranking: equality above is not vacuous
    assert topk_overlap(c1, c3, 4) == pytest.approx(_overlap_by_hand(c1, c3, 4))


def _overlap_by_hand(a, b, r):
    """Mean over (layer, KV head) of the share of a's top-r channels in b's top-r, from the rankings' lists."""
    shares = [len(set(ra[:r]) & set(rb[:r])) / r
              for layer in a.layers for ra, rb in zip(a.rankings[layer].tolist(), b.rankings[layer].tolist())]
    return sum(shares) / len(shares)


def test_topk_overlap_on_a_known_case():
    """Two heads of head_dim 6: top-2 share {0, 1} vs {1, 5} (1 of 2) and {2, 3} vs {3, 2} (2 of 2): mean 0.75;
    top-3 shares {0, 1, 2} vs {1, 5, 0} (2 of 3) and {2, 3, 4} vs {3, 2, 4} (3 of 3): mean 5/6."""
    a = ChannelConfig.from_rankings({0: [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 0, 1]]}, num_heads=2)
    b = ChannelConfig.from_rankings({0: [[1, 5, 0, 2, 3, 4], [3, 2, 4, 0, 1, 5]]}, num_heads=2)
    assert topk_overlap(a, b, 2) == 0.75 and topk_overlap(a, b, 3) == pytest.approx(5 / 6)
    assert topk_overlap(a, b, 6) == 1.0 and topk_overlap(a, a, 1) == 1.0 and topk_overlap(a, b, 1) == 0.0


def test_rope_layout_detection_and_pair_aware():
    ids = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0))  # many repeated tokens
    for layout in ("rotate_half", "interleaved"):
        model = ToyModel([[[1, 2]], [[0, 3]]], hq=2, hkv=1, d=8, rope=layout)
        cfg = calibrate(model, ids, tokens=None, block_size=64, progress=False, pair_aware=True)
        assert cfg.rope_layout == layout and cfg.pair_aware
        assert pair_share(cfg, 4) == 1.0
        for layer, planted in ((0, [1, 2]), (1, [0, 3])):
            top = set(cfg.channels(layer, 4)[0].tolist())
            assert top == set(planted) | {rope_partner(c, 8, layout) for c in planted}
    plain = ToyModel([[[1, 2]]], hq=2, hkv=1, d=8)  # no RoPE at all
    assert calibrate(plain, ids, tokens=None, block_size=64, progress=False).rope_layout is None
    with pytest.raises(ValueError, match="pass rope_layout="):
        calibrate(plain, ids, tokens=None, block_size=64, progress=False, pair_aware=True)
    for dtype in (torch.float32, torch.bfloat16):  # HF Llama: rotate_half, also through bf16 rounding
        llama = tiny_llama().to(dtype)
        assert calibrate(llama, ids, tokens=None, progress=False).rope_layout == "rotate_half"


def test_token_blocks():
    class Tok:
        eos_token_id = 0

        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    blocks = token_blocks({"a": "abcde", "b": "fg"}, block_size=3, tokens=None, tokenizer=Tok())
    assert [b.tolist() for b in blocks] == [[97, 98, 99], [100, 101, 0], [102, 103]]
    blocks = token_blocks(torch.arange(20).view(2, 10), block_size=4, tokens=13)
    assert [b.numel() for b in blocks] == [4, 4, 2, 3]  # each row cut on its own; the 1-token tail is skipped
    assert [b.tolist() for b in token_blocks([[1, 2, 3], [4, 5]], 8, 5)] == [[1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="no tokenizer"):
        token_blocks(["text"], 8, None)
    with pytest.raises(ValueError, match="block_size"):
        token_blocks([1, 2, 3], 1, None)
    with pytest.raises(ValueError, match="tokens must be a positive int"):
        token_blocks([1, 2, 3], 8, 0)
    with pytest.raises(ValueError, match="empty"):
        token_blocks([], 8, None)


def test_eager_only_model_is_switched_to_sdpa_and_restored():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    ids = torch.arange(30) % 64
    cfg = calibrate(model, ids, tokens=None, progress=False)
    assert cfg.layers == [0, 1] and model.config._attn_implementation == "eager"

    class NoAttention(nn.Module):
        def forward(self, input_ids, **kw):
            return input_ids

    with pytest.raises(ValueError, match="no scaled_dot_product_attention call"):
        calibrate(NoAttention(), ids, tokens=None, progress=False)


# ------------------------------------------------------------------------------------ CLI and cached default
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama saved with the embedded model's tokenizer (only the tokenizer is loaded)."""
    from transformers import AutoTokenizer

    from dsc.assets import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    model = tiny_llama(vocab=len(tokenizer))
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_calibrate(tiny_model_dir, tmp_path, capsys):
    from dsc.cli import main

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "cfg.json"
    rc = main(["calibrate", "--model", str(tiny_model_dir), "--data", str(text), "--tokens", "96",
               "--block-size", "48", "--pair-aware", "--no-progress", "--out", str(out)])
    assert rc == 0 and "96 tokens" in capsys.readouterr().out
    cfg = ChannelConfig.load(out)
    assert cfg.pair_aware and cfg.rope_layout == "rotate_half" and cfg.tokens == 96 and cfg.num_layers == 2
    ref = tmp_path / "ref.json"
    assert main(["calibrate", "--model", str(tiny_model_dir), "--data", str(text), "--tokens", "64",
                 "--format", "reference", "--no-progress", "--out", str(ref)]) == 0
    assert import_reference(ref, num_heads=4, num_kv_heads=2).head_dim == 16
    assert main(["calibrate", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nope.txt"),
                 "--out", str(out)]) == 2


@pytest.mark.parametrize("case", ["dir", "suffix", "file_parent", "dtype", "block"])
def test_cli_calibrate_checks_arguments_before_loading_the_model(case, tmp_path, monkeypatch, capsys):
    """Issue 12: a wrong --out or --dtype fails at once with a clear message, not after calibrating."""
    from dsc import assets
    from dsc.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(assets, "load_model", no_load)
    (tmp_path / "afile").write_text("x")
    out, extra = str(tmp_path / "cfg.json"), []
    want = {"dir": "is a directory; pass the file to write, e.g. '" + str(tmp_path / "cfg.json") + "'",
            "suffix": "must name a .json file (the config is JSON), e.g. '" + str(tmp_path / "cfg.json") + "'",
            "file_parent": "cannot be created: '" + str(tmp_path / "afile") + "' is a file",
            "dtype": "--dtype 'nosuch' is not a model dtype; use one of float32, bfloat16, float16, float64",
            "block": "--block-size must be at least 2"}[case]
    if case == "dir":
        out = str(tmp_path)
    elif case == "suffix":
        out = str(tmp_path / "cfg")
    elif case == "file_parent":
        out = str(tmp_path / "afile" / "sub" / "cfg.json")
    elif case == "dtype":
        extra = ["--dtype", "nosuch"]
    else:
        extra = ["--block-size", "1"]
    assert main(["calibrate", "--out", out, *extra]) == 2
    assert want in capsys.readouterr().err


def test_cli_calibrate_creates_missing_output_folders(tiny_model_dir, tmp_path):
    from dsc.cli import main

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    out = tmp_path / "new" / "deeper" / "cfg.json"
    assert main(["calibrate", "--model", str(tiny_model_dir), "--data", str(text), "--tokens", "32",
                 "--dtype", "bfloat16", "--no-progress", "--out", str(out)]) == 0
    assert ChannelConfig.load(out).tokens == 32


def test_default_config_is_cached(tiny_model_dir, tmp_path, monkeypatch):
    from dsc.assets import load_model
    from dsc.calibration import default as default_mod

    monkeypatch.setenv("DSC_CACHE", str(tmp_path / "cache"))
    model, tok = load_model(tiny_model_dir)
    cfg = default_mod.default_config(model=model, tokenizer=tok, tokens=64, progress=False)
    files = list((tmp_path / "cache" / "calibration").glob("*.json"))
    assert len(files) == 1 and ChannelConfig.load(files[0]) == cfg

    def boom(*a, **k):
        raise AssertionError("recalibrated although a cached config exists")

    monkeypatch.setattr("dsc.calibration.stats.calibrate", boom)
    assert default_mod.default_config(model=model, tokenizer=tok, tokens=64, progress=False) == cfg
    files[0].write_text("{")  # corrupt cache: recalibrate with a warning
    monkeypatch.undo()
    monkeypatch.setenv("DSC_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="recalibrating"):
        assert default_mod.default_config(model=model, tokenizer=tok, tokens=64, progress=False) == cfg


def test_merge_equals_one_collection_and_compiled_forward_is_calibrated_eagerly():
    model = tiny_llama()
    ids = torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(5))
    whole = collect_stats(model, ids, tokens=None, block_size=32, progress=False)
    parts = collect_stats(model, ids[:32], tokens=None, progress=False).merge(
        collect_stats(model, ids[32:], tokens=None, progress=False))
    assert parts.tokens == whole.tokens == 64 and parts.counts == whole.counts
    for m in ("qk", "q", "k"):
        for layer in (0, 1):
            torch.testing.assert_close(parts.mean(m)[layer], whole.mean(m)[layer], rtol=1e-12, atol=0)
    eager_cfg = calibrate(model, ids, tokens=None, block_size=32, progress=False)
    original = model.forward
    model.forward = torch.compile(original, backend="eager")
    try:
        model(input_ids=ids[None, :8])  # a graph exists; calibration must still see every SDPA call
        assert calibrate(model, ids, tokens=None, block_size=32, progress=False) == eager_cfg
    finally:
        model.forward = original
    assert hash(eager_cfg) == hash(ChannelConfig.from_dict(eager_cfg.to_dict()))
    assert len({eager_cfg, ChannelConfig.from_dict(eager_cfg.to_dict())}) == 1


def test_measure_script(tiny_model_dir, tmp_path):
    from dsc.calibration.measure import main

    out = tmp_path / "m.json"
    assert main(["--model", str(tiny_model_dir), "--checkpoints", "64", "128", "--block-size", "32",
                 "--ranks", "4", "8", "--json", str(out)]) == 0  # head_dim 16: r < 16 leaves something out
    res = json.loads(out.read_text())
    assert set(res["times_s"]) == {"64", "128"}
    # The script's numbers equal ones computed here from calibrate(tokens=N) and the definitions.
    from dsc.assets import calibration_essays, load_model

    model, tok = load_model(str(tiny_model_dir))
    c64, c128 = (calibrate(model, calibration_essays(), tokenizer=tok, tokens=n, block_size=32, progress=False)
                 for n in (64, 128))
    assert c128.rope_layout == "rotate_half"
    half = c128.head_dim // 2
    for r in (4, 8):
        assert res[f"overlap_64_vs_128_r{r}"] == pytest.approx(_overlap_by_hand(c64, c128, r), abs=5e-5)
        rows = [row[:r] for layer in c128.layers for row in c128.rankings[layer].tolist()]
        paired = sum((c + half) % c128.head_dim in row for row in rows for c in row) / (r * len(rows))
        assert res[f"pair_share_128_r{r}"] == pytest.approx(paired, abs=5e-5)
