"""torchao int8 weight-only quantized models (issue 17): the weight fingerprint, calibration, the backend's config
check and decode, ``dsc.explain`` and ``dsc bench decode --quant int8`` all work on them. torchao's int8 weights
are tensor subclasses that support few ops (not even ``reshape``). Tiny random Llama models keep this fast."""
from __future__ import annotations

import copy
import json

import pytest
import torch

quantization = pytest.importorskip("torchao.quantization")

import dsc  # noqa: E402
from dsc.calibration.config import ChannelConfig, model_fingerprint, topk_overlap  # noqa: E402


def tiny_llama(layers=3, hq=4, hkv=2, d=16, vocab=64, seed=0, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hq * d, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d, max_position_embeddings=512,
                      rope_theta=1000.0, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def int8(model):
    q = copy.deepcopy(model)
    quantization.quantize_(q, quantization.Int8WeightOnlyConfig())
    w = q.model.layers[0].self_attn.k_proj.weight
    assert type(w) not in (torch.Tensor, torch.nn.Parameter)  # really a torchao subclass
    with pytest.raises(Exception):
        w.reshape(-1)  # what made the old fingerprint crash
    return q


@pytest.fixture(scope="module")
def pair():
    m = tiny_llama()
    return m, int8(m)


def _ids(n=96, seed=3):
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))


def test_fingerprint_ignores_quantization_and_dtype_but_not_the_checkpoint(pair):
    m, q = pair
    fp = model_fingerprint(m)
    assert fp.startswith("sha256-v2:") and model_fingerprint(q) == fp
    assert model_fingerprint(copy.deepcopy(m).to(torch.bfloat16)) == fp
    tied = tiny_llama(tie=True)
    tq = int8(tied)
    assert tq.lm_head.weight is not tq.model.embed_tokens.weight  # quantize_ unties: names must not matter
    assert model_fingerprint(tq) == model_fingerprint(tied)
    # another checkpoint differs: other random weights, or one changed norm or embedding row
    assert model_fingerprint(tiny_llama(seed=1)) != fp
    assert model_fingerprint(int8(tiny_llama(seed=1))) != fp
    for edit in (lambda x: x.model.layers[1].input_layernorm.weight, lambda x: x.model.embed_tokens.weight):
        other = copy.deepcopy(m)
        with torch.no_grad():
            edit(other).mul_(1.5)
        assert model_fingerprint(other) != fp
    # ... and another architecture of the same sizes (model type is hashed)
    assert model_fingerprint(tiny_llama(layers=2)) != model_fingerprint(tiny_llama(layers=3))


def test_calibrate_on_int8_model(pair):
    m, q = pair
    cq = dsc.calibrate(q, _ids(), tokens=None, block_size=48, progress=False)
    cm = dsc.calibrate(m, _ids(), tokens=None, block_size=48, progress=False)
    assert cq.layers == [0, 1, 2] and cq.fingerprint == cm.fingerprint
    assert topk_overlap(cq, cm, 8) >= 0.75  # int8 weights barely move the statistic
    cm.check_model(q)  # a config calibrated on the full model passes for its quantized copy, weights included
    cq.check_model(m)
    with pytest.raises(ValueError, match="other weights"):
        cm.check_model(int8(tiny_llama(seed=1)))
    with pytest.raises(ValueError, match="num_layers=3; this model has num_layers=2"):
        cm.check_model(int8(tiny_llama(layers=2)))


def test_backend_decodes_an_int8_model(pair):
    """The backend's config check and the rewrite on a quantized model; at a budget covering the whole cache the
    sparse op runs every decode step and the tokens equal the quantized model's own."""
    _, q = pair
    cfg = ChannelConfig.random(3, 4, 2, 16, seed=0)
    ids = _ids(24)[None]
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        ref = q.generate(ids, **kw)
    torch._dynamo.reset()
    backend = dsc.sparse_backend(channels=cfg, inner="eager", budget=4096, min_length=1, dense_layers=(0,))
    q.forward = torch.compile(q.forward, backend=backend)
    try:
        with torch.no_grad():
            out = q.generate(ids, **kw)
    finally:
        del q.forward
        torch._dynamo.reset()
    assert backend.runtime.stats["sparse_calls"] == 3 * 2  # 3 decode steps x 2 sparse layers
    assert out.tolist() == ref.tolist()


def test_explain_on_int8_model(pair):
    _, q = pair
    cfg = ChannelConfig.random(3, 4, 2, 16, seed=0)
    torch._dynamo.reset()
    try:
        rep = dsc.explain(q, {"input_ids": _ids(16)[None]}, options={"channels": cfg}, max_new_tokens=2)
    finally:
        torch._dynamo.reset()
    counts = rep.counts()
    assert counts["sites"] >= 3 and counts["sparse"] >= 1, str(rep)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 3-layer Llama saved with the embedded model's tokenizer."""
    from transformers import AutoTokenizer

    from dsc.assets import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    folder = tmp_path_factory.mktemp("tiny-int8")
    tiny_llama(vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_bench_decode_int8_dense_and_dsparse(tiny_model_dir, tmp_path, monkeypatch):
    """`dsc bench decode --quant int8 --policy dense,dsparse` (issue 17's crash): the default channel config is
    calibrated on the quantized model (fingerprint, then calibration) and both policies run."""
    from dsc.cli import main

    monkeypatch.setenv("DSC_CACHE", str(tmp_path / "cache"))  # calibrate afresh, on the quantized model
    path = tmp_path / "b.json"
    assert main(["bench", "decode", "--model", str(tiny_model_dir), "--contexts", "64", "--batch", "2",
                 "--compile", "eager", "--policy", "dense,dsparse", "--quant", "int8", "--budget", "8",
                 "--steps", "2", "--warmup", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["policy"], r["quant"]) for r in rows] == [("dense", "int8"), ("dsparse", "int8")]
    assert all(r["tok_per_s"] > 0 for r in rows) and rows[1]["speedup"] == rows[1]["speedup_best"] > 0
    cached = list((tmp_path / "cache" / "calibration").glob("*.json"))
    assert len(cached) == 1 and ChannelConfig.load(cached[0]).num_layers == 3


def test_speedup_against_the_fastest_dense_run():
    """Issue 17: a measured comparison is made against the fastest dense run of the same (quantized) model, beside
    the same-compiler one."""
    from dsc.bench.decode import add_speedups

    def row(policy, compile, ms, quant="int8"):
        return {"policy": policy, "compile": compile, "ms_per_step": ms, "quant": quant, "dtype": "float32",
                "context": 64, "batch": 2}

    rows = [row("dense", "eager", 10.0), row("dense", "inductor", 4.0), row("dsparse", "eager", 5.0),
            row("dsparse", "inductor", 2.0), row("dense", "eager", 3.0, "none"), row("dsparse", "eager", 6.0, "none")]
    add_speedups(rows)
    assert [r["speedup"] for r in rows] == [1.0, 1.0, 2.0, 2.0, 1.0, 0.5]
    assert [r["speedup_best"] for r in rows] == [0.4, 1.0, 0.8, 2.0, 1.0, 0.5]
    assert [r["best_dense"] for r in rows] == ["inductor"] * 4 + ["eager"] * 2


def test_weight_bytes_count_int8_codes_not_the_dtype_they_stand_for(pair):
    """The byte limit's weight term: an int8 weight-only Linear reads one byte per weight plus a per-row fp32 scale
    and int8 zero point (what the codes are stored as), not the 4 bytes of the fp32 it stands for."""
    from dsc.bytes import weight_bytes

    m, q = pair
    linears = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
    others = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 1)  # norms (fp32)
    assert weight_bytes(m) == sum(x.weight.numel() for x in linears) * 4 + others * 4
    assert weight_bytes(q) == sum(x.out_features * (x.in_features + 4 + 1) for x in linears) + others * 4
