"""Foundation: embedded assets, the real model, the CLI on tiny settings, the backend entry point."""
import json
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsc import assets
from dsc.bench.common import parse_list
from dsc.cli import main
from dsc.generation import greedy_decode


def test_essay_split_is_disjoint_deterministic_and_complete():
    cal, ev = assets.calibration_essays(), assets.evaluation_essays()
    assert cal and ev
    assert set(cal).isdisjoint(ev)
    assert set(cal) | set(ev) == set(assets.essays())
    assert list(cal) == list(assets.calibration_essays()) and list(ev) == list(assets.evaluation_essays())
    assert sum(map(len, ev.values())) > 100_000 and sum(map(len, cal.values())) > 300_000
    assert len(ev) < len(cal)  # about a third held out for evaluation


def test_model_answers_paris(model, tokenizer):
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    for cache in ("static", "dynamic"):
        out = greedy_decode(model, ids, 4, cache=cache)
        assert "Paris" in tokenizer.decode(out.tokens[0])


def test_left_padded_batch_matches_single_prompts(model, tokenizer):
    prompts = ["The capital of France is", "Hello, my name is Bob and I like to"]
    side = tokenizer.padding_side  # the tokenizer is shared by the session: restore what it had
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    assert tokenizer.padding_side == side
    assert not batch.attention_mask[0, 0] and batch.attention_mask[:, -1].all()  # really left-padded
    together = greedy_decode(model, batch.input_ids, 5, attention_mask=batch.attention_mask)
    for i, p in enumerate(prompts):
        alone = greedy_decode(model, tokenizer(p, return_tensors="pt").input_ids, 5)
        assert torch.equal(together.tokens[i], alone.tokens[0])


@given(st.lists(st.integers(1, 64), min_size=1, max_size=5))
def test_parse_list_roundtrip(values):
    assert parse_list(",".join(map(str, values))) == values
    assert parse_list(",".join(f"{v}K" for v in values)) == [v * 1024 for v in values]


def test_parse_list_fractions_and_errors():
    assert parse_list("1/8,0.5", float) == [0.125, 0.5]
    with pytest.raises(ValueError, match="batch size"):
        parse_list("4,x", int, "batch size")


def test_cli_demo(capsys):
    # A prompt shorter than the budget: the sparse op runs, selects every token, and must agree with dense.
    assert main(["demo", "--prompt", "The capital of France is", "--max-new-tokens", "4", "--budget", "64",
                 "--min-length", "0"]) == 0
    out = capsys.readouterr().out
    dense = re.search(r"dense +'(.*)'", out).group(1)
    sparse = re.search(r"dsparse +'(.*)'", out).group(1)
    assert "Paris" in dense and sparse == dense
    assert "agreement  4/4" in out and "tok/s" in out
    assert int(re.search(r"sparse op +(\d+) calls", out).group(1)) == 3 * 28  # 3 decode steps x 28 sparse layers


def test_cli_bench_decode(capsys, tmp_path):
    path = tmp_path / "b.json"
    # One inductor configuration: each compile costs about a minute on 2 cores.
    assert main(["bench", "decode", "--contexts", "32", "--batch", "2", "--compile", "eager,inductor",
                 "--steps", "2", "--warmup", "1", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert [(r["batch"], r["compile"]) for r in res["results"]] == [(2, "eager"), (2, "inductor")]
    assert all(r["tok_per_s"] > 0 for r in res["results"])
    assert res["machine"]["cores"] >= 1


def test_cli_bench_decode_offload_measures_traffic_and_cache_memory(tmp_path):
    path = tmp_path / "o.json"
    assert main(["bench", "decode", "--contexts", "64", "--batch", "1", "--compile", "eager", "--policy", "dense",
                 "--offload", "--steps", "2", "--warmup", "1", "--json", str(path)]) == 0
    rows = {r["policy"]: r for r in json.loads(path.read_text())["results"]}
    dense, off = rows["dense"], rows["dsparse+offload"]
    # only the 2 dense layers of 30 keep rows on the device; the rest are one-element placeholders
    assert 0 < off["kv_cache_mb"] <= dense["kv_cache_mb"] * 2 / 30 + 0.01
    assert 0 < off["h2d_share"] < 1


def test_cli_bench_offload_runs_on_cpu(tmp_path):
    path = tmp_path / "b.json"
    assert main(["bench", "offload", "--contexts", "1K", "--layers", "2", "--shape", "4x2x32", "--dtype", "float32",
                 "--repeats", "1", "--warmup", "0", "--json", str(path)]) == 0
    rows = {r["policy"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"whole-layer", "ds staged", "ds on-device", "dense on-device"}  # zero-copy: GPU only
    assert 0 < rows["ds staged"]["MB"] <= rows["whole-layer"]["MB"] / 10


def test_cli_eval_ppl(capsys, tmp_path):
    path = tmp_path / "p.json"
    assert main(["eval", "ppl", "--context", "128", "--windows", "2", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert res["tokens"] == 2 * 127
    assert 5 < res["ppl"] < 200  # a real model on real English text


@pytest.mark.parametrize("argv, message", [
    (["eval", "ppl", "--model", "/no/such/model"], "does not exist"),
    (["eval", "ppl", "--model", "{tmp}"], "not a Hugging Face model folder"),
    (["eval", "ppl", "--context", "100000"], "exceeds the model's limit"),
    (["bench", "decode", "--batch", "0", "--compile", "eager"], "must be positive"),
    (["bench", "decode", "--compile", "tvm"], "--compile values"),
])
def test_cli_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_dsparse_entry_point_resolves_in_a_fresh_interpreter():
    # No `import dsc`: the string must resolve through the torch_dynamo_backends entry point, and compiling
    # without a channel config must fail with the message that says how to calibrate.
    code = ("import sys, torch\n"
            "from torch._dynamo import list_backends\n"
            "from torch._dynamo.backends.registry import lookup_backend\n"
            "assert 'dsc' not in sys.modules\n"
            "assert 'dsparse' in list_backends(exclude_tags=())\n"
            "fn = lookup_backend('dsparse')\n"
            "assert fn.__module__ == 'dsc.backend', fn.__module__\n"
            "f = torch.compile(lambda x: x * 2 + 1, backend='dsparse')\n"
            "try:\n"
            "    f(torch.ones(3))\n"
            "except Exception as e:\n"
            "    assert 'dsc calibrate' in str(e), e\n"
            "    print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "dsc.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "bench" in r.stdout and "demo" in r.stdout
