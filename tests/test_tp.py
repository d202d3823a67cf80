"""Tensor parallelism on torch.distributed (HF ``tp_plan="auto"``, 2 ranks, gloo on CPU): each rank keeps the
channel rankings, labels and selection of its own KV heads; Double Sparsity adds no communication. Tokens equal the
single-process runs: dense at full budget, and dsparse at a binding budget with per-group and per-head selection."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import CHANNELS, generate, tiny
from tp_worker import RUNS

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def _single_process(model, opts):
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="dsparse", options={
        "channels": CHANNELS, "inner": "eager", "dense_layers": (0,), "r": 8, "sink": 1, "recent": 2, **opts})
    try:
        return generate(model, torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0)),
                        6).sequences.tolist()
    finally:
        del model.forward
        torch._dynamo.reset()


def test_two_rank_tensor_parallel_decode_equals_one_process(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path / "model")
    CHANNELS.save(tmp_path / "channels.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(HERE / "tp_worker.py"), str(tmp_path / "model"), str(tmp_path / "channels.json"), str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in range(2)]
    with torch.no_grad():
        dense = model.generate(torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0)),
                               max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0).tolist()
    for name, opts in RUNS.items():
        want = _single_process(model, opts)
        for r in ranks:
            assert r[name]["tokens"] == want, (name, r[name]["tokens"], want)
            assert r[name]["sparse_calls"] == 5 * 2  # 5 decode steps x 2 sparse layers, on each rank
    assert ranks[0]["full"]["tokens"] == dense


def test_shard_takes_each_ranks_contiguous_kv_heads():
    """HF's column-wise attention sharding: rank r holds KV heads [r * n, (r + 1) * n)."""
    from dsc.calibration.config import ChannelConfig

    cfg = ChannelConfig.random(3, 8, 4, 16, seed=5)
    for rank in range(2):
        part = cfg.shard(rank, 2)
        assert (part.num_heads, part.num_kv_heads, part.head_dim) == (4, 2, 16)
        for layer in cfg.layers:
            assert torch.equal(part.channels(layer, 8), cfg.channels(layer, 8)[2 * rank:2 * rank + 2])
        assert cfg.shard(rank, 2) is part  # cached: every graph of a rank shares its label specs
    with pytest.raises(ValueError, match="divide evenly"):
        cfg.shard(0, 3)


def test_bench_decode_tp_reports_each_rank(tmp_path):
    """``dsc bench decode --tp 2`` relaunches itself under torchrun; each rank reports its tok/s and the KV cache
    its own heads hold: half of the one-process cache."""
    from transformers import AutoTokenizer

    from dsc.assets import default_model_path
    from dsc.calibration.config import ChannelConfig
    from dsc.cli import main

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    import transformers as T

    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    ChannelConfig.random(3, 4, 2, 16, seed=2).save(tmp_path / "channels.json")
    args = ["bench", "decode", "--model", str(tmp_path / "model"), "--contexts", "48", "--batch", "1", "--compile",
            "eager", "--policy", "dense,dsparse", "--channels", str(tmp_path / "channels.json"), "--budget", "8",
            "--steps", "2", "--warmup", "1"]
    assert main(args + ["--json", str(tmp_path / "one.json")]) == 0
    assert main(args + ["--tp", "2", "--json", str(tmp_path / "tp.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    for rank in range(2):
        rows = json.loads((tmp_path / f"tp.json.rank{rank}.json").read_text())["results"]
        assert [r["policy"] for r in rows] == ["dense", "dsparse"]
        for r, whole in zip(rows, one):
            assert r["tok_per_s"] > 0 and r["kv_cache_mb"] == pytest.approx(whole["kv_cache_mb"] / 2)
