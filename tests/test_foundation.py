"""Foundation: embedded assets, the real model, the CLI on tiny settings, the backend entry point."""
import json
import os
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
from helpers import config_only


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


def _png(path) -> bytes:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, f"{path} is not a drawn PNG"
    return data


def _table(out: str, first_header: str) -> list[dict]:
    """The rows of the aligned table whose header line starts with ``first_header`` (numbers as floats)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_header])
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 2:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(header) or not cells[0].isdigit():
            break
        rows.append({h: int(c) if c.isdigit() else float(c) if re.fullmatch(r"[\d.e+-]+", c) else c
                     for h, c in zip(header, cells)})
    return rows


def test_cli_demo(capsys, tmp_path):
    # A prompt shorter than the budget: the sparse op runs, selects every token, and must agree with dense.
    # Then a tiny speed sweep (2 contexts, batch 2, 1 timed step) with its table, crossover line and plot.
    png = tmp_path / "demo.png"
    assert main(["demo", "--prompt", "The capital of France is", "--max-new-tokens", "4", "--budget", "64",
                 "--min-length", "0", "--sweep-contexts", "40,64", "--sweep-batch", "2", "--steps", "1",
                 "--warmup", "1", "--threads", "1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    dense = re.search(r"dense +'(.*)'", out).group(1)
    sparse = re.search(r"dsparse +'(.*)'", out).group(1)
    assert "Paris" in dense and sparse == dense
    assert "agreement  4/4" in out and "tok/s" in out
    assert int(re.search(r"sparse op +(\d+) calls", out).group(1)) == 3 * 28  # 3 decode steps x 28 sparse layers

    from dsc.demo import crossover

    rows = _table(out, "context")
    assert [r["context"] for r in rows] == [40, 64]
    for r in rows:
        assert r["dense ms/step"] > 0 and r["dsparse ms/step"] > 0
        assert r["speedup"] == pytest.approx(r["dense ms/step"] / r["dsparse ms/step"], rel=0.02)
        # budget 64 >= context: dsparse keeps every token and reads the labels too (K/V limit < 1)
        assert 0 < r["K/V limit"] < 1 and 0 < r["step limit"] <= 1
    assert "baseline   dense eager" in out
    line = re.search(r"crossover  (.*)", out).group(1)
    expected = crossover([{"context": r["context"], "speedup": r["speedup"]} for r in rows])
    assert re.match(r"(not reached within the sweep \(40, 64\)|(at or below )?(40|64) tokens)", line)
    if all(abs(r["speedup"] - 1) > 0.01 for r in rows):  # printed to 3 digits: which side of 1 is then certain
        assert line.split(":")[0] == expected.split(":")[0]
    assert f"plot       wrote {png}" in out
    assert re.search(r"machine    other processes kept \d+% of the \d+ cores busy during the sweep", out)
    _png(png)


def test_crossover_names_the_first_faster_context_or_none():
    from dsc.demo import crossover

    def rows(*speedups):
        return [{"context": 1024 << i, "speedup": x} for i, x in enumerate(speedups)]

    assert crossover(rows(0.7, 1.2, 1.6)).startswith("2048 tokens: the first swept context where dsparse is faster "
                                                    "(1.20x; 0.70x at 1024)")
    assert crossover(rows(0.7, 0.9)).startswith("not reached within the sweep (1024, 2048)")
    assert "closest 0.90x at 2048" in crossover(rows(0.7, 0.9))
    assert crossover(rows(1.1, 1.3)).startswith("at or below 1024 tokens")
    assert crossover(rows(0.8, 1.1, 0.95)).endswith("but slower again at 4096 (noise, or no stable crossover)")
    assert crossover(list(reversed(rows(0.8, 1.1)))).startswith("2048 tokens")  # order of the rows does not matter


def test_plot_ms_per_step_draws_one_line_per_combination(tmp_path):
    from dsc.bench.common import plot_ms_per_step

    rows = [{"policy": p, "compile": "eager", "batch": b, "context": c, "ms_per_step": ms}
            for p, ms in (("dense", 10.0), ("dsparse", 8.0)) for b in (1, 4) for c in (1024, 2048)]
    labels = plot_ms_per_step(str(tmp_path / "p.png"), rows, ("policy", "compile", "batch"), "t")
    assert labels == ["dense batch 1", "dense batch 4", "dsparse batch 1", "dsparse batch 4"]
    _png(tmp_path / "p.png")
    one = plot_ms_per_step(str(tmp_path / "q.png"), rows[:2], ("policy", "compile", "batch"))
    assert one == ["dense eager batch 1"]


def test_cli_bench_decode_plot(capsys, tmp_path):
    png = tmp_path / "d.png"
    assert main(["bench", "decode", "--contexts", "24,32", "--batch", "1", "--compile", "eager", "--policy",
                 "dense", "--steps", "1", "--warmup", "1", "--threads", "1", "--plot", str(png)]) == 0
    assert f"wrote plot {png}" in capsys.readouterr().out
    _png(png)


def test_cli_bench_decode(capsys, tmp_path):
    path = tmp_path / "b.json"
    # One inductor configuration: each compile costs about a minute on 2 cores.
    assert main(["bench", "decode", "--contexts", "32", "--batch", "2", "--compile", "eager,inductor",
                 "--steps", "2", "--warmup", "1", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert [(r["batch"], r["compile"]) for r in res["results"]] == [(2, "eager"), (2, "inductor")]
    assert all(r["tok_per_s"] > 0 for r in res["results"])
    fastest = min(res["results"], key=lambda r: r["ms_per_step"])  # the table names which dense run won
    assert all(r["best_dense"] == fastest["compile"] for r in res["results"]) and fastest["speedup_best"] == 1
    assert "fastest dense" in capsys.readouterr().out
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


def test_cli_bench_decode_one_dsparse_row_per_label_format(tmp_path, capsys):
    path = tmp_path / "l.json"
    assert main(["bench", "decode", "--contexts", "640", "--batch", "1", "--compile", "eager", "--policy",
                 "dense,dsparse", "--label-bits", "16,4", "--steps", "1", "--warmup", "1", "--threads", "1",
                 "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["policy"], r["labels"]) for r in rows] == [("dense", ""), ("dsparse", 16), ("dsparse", 4)]
    assert all(r["speedup"] > 0 for r in rows)
    assert main(["bench", "decode", "--contexts", "64", "--policy", "dsparse", "--label-bits", "12"]) == 2
    assert "--label-bits values must be among (16, 8, 4)" in capsys.readouterr().err


def test_cli_bench_decode_random_weights_from_a_config_alone(tmp_path):
    """``--random-weights``: a model shape measured without its checkpoint (the embedded tokenizer makes the
    prompt); both policies decode it, and the cache has the config's shape."""
    folder = config_only(tmp_path / "shape", vocab=49152)
    path = tmp_path / "r.json"
    assert main(["bench", "decode", "--model", str(folder), "--random-weights", "--contexts", "96", "--batch", "2",
                 "--compile", "eager", "--policy", "dense,dsparse", "--budget", "8", "--steps", "2", "--warmup", "1",
                 "--threads", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [r["policy"] for r in rows] == ["dense", "dsparse"]
    kv_bytes = 3 * 2 * 2 * 2 * 96 * 16 * 4  # layers x (K, V) x batch x KV heads x context x head_dim x fp32
    assert all(r["kv_cache_mb"] * 2**20 == kv_bytes and r["tok_per_s"] > 0 for r in rows)


def test_cli_bench_decode_refuses_a_cache_beyond_free_memory_before_the_prefill(tmp_path, capsys):
    folder = config_only(tmp_path / "shape")  # 3 layers x 2 KV heads x 16 x fp32: 768 bytes per token and row
    assert main(["bench", "decode", "--model", str(folder), "--random-weights", "--contexts", "1000", "--batch",
                 str(2**40), "--compile", "eager"]) == 2
    err = capsys.readouterr().err
    assert "cache of context 1000 at batch 1099511627776 needs 786432000.0 GiB" in err, err


def test_random_weights_are_reproducible_and_refuse_a_tokenizer_beyond_the_vocabulary(tmp_path):
    from dsc.assets import AssetError, load_model

    folder = config_only(tmp_path / "shape", vocab=49152)
    a, _ = load_model(folder, random_weights=True)
    b, _ = load_model(folder, random_weights=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.model.layers[0].self_attn.q_proj.weight.std() > 0.01  # initialised, not zeros
    with pytest.raises(AssetError, match="more than the config's vocab_size 64"):
        load_model(config_only(tmp_path / "small", vocab=64), random_weights=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no CUDA device is visible")
def test_cli_bench_decode_on_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert main(["bench", "decode", "--device", "cuda", "--compile", "eager"]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err


def test_dsc_command_prefers_huge_pages_unless_told(monkeypatch):
    from dsc.bench.common import huge_pages
    from dsc.cli import HUGE_PAGES_ENV, prefer_huge_pages

    monkeypatch.delenv(HUGE_PAGES_ENV, raising=False)
    assert "THP_MEM_ALLOC_ENABLE=unset" in huge_pages()
    prefer_huge_pages()
    assert os.environ[HUGE_PAGES_ENV] == "1" and "THP_MEM_ALLOC_ENABLE=1" in huge_pages()
    monkeypatch.setenv(HUGE_PAGES_ENV, "0")
    prefer_huge_pages()
    assert os.environ[HUGE_PAGES_ENV] == "0"
    mode = huge_pages().rsplit("kernel THP ", 1)[1].rstrip(")")
    assert huge_pages().startswith("on" if mode == "always" else "off")


def test_torch_puts_large_tensors_on_huge_pages_under_the_dsc_default():
    """What the default buys, in a fresh process: PyTorch honours the switch (it reads it at its first
    allocation), so a large tensor's memory is on 2 MB pages."""
    if "[never]" in _thp_mode() or not _thp_mode():
        pytest.skip("transparent huge pages are off on this machine")
    code = ("from dsc.cli import prefer_huge_pages; prefer_huge_pages(); import torch; x = torch.ones(64 << 20); "
            "print(open('/proc/self/smaps_rollup').read().split('AnonHugePages:')[1].split()[0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) >= 2048  # kB: at least one 2 MB page (fewer than all where memory is fragmented)


def _thp_mode() -> str:
    try:
        return open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return ""


def test_cli_bench_offload_runs_on_cpu(capsys, tmp_path):
    path = tmp_path / "b.json"
    assert main(["bench", "offload", "--contexts", "1K", "--layers", "2", "--shape", "4x2x32", "--dtype", "float32",
                 "--repeats", "1", "--warmup", "0", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    rows = {r["policy"]: r for r in res["rows"]}
    assert set(rows) == {"whole-layer", "ds staged", "ds on-device", "dense on-device"}  # zero-copy: GPU only
    assert 0 < rows["ds staged"]["MB"] <= rows["whole-layer"]["MB"] / 10
    # the dense row is the fastest of the dense candidates, named in the output; ratios are against it
    (cands,) = res["dense_candidates"]
    assert {"sdpa-gqa", "packed-gqa", "matmul-softmax", "repeat-kv"} <= set(cands["dense"])
    best = min(cands["dense"], key=cands["dense"].get)
    assert cands["best_dense"] == best == rows["dense on-device"]["best_dense"]
    assert rows["dense on-device"]["ms"] == cands["dense"][best]
    for r in rows.values():
        assert r["vs_dense"] == pytest.approx(rows["dense on-device"]["ms"] / r["ms"])
    assert f"best dense S=1024: {best} (the 'dense on-device' row" in capsys.readouterr().out


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
    (["bench", "decode", "--compile", "eager,cudagraphs"], "needs --device cuda"),
    (["bench", "decode", "--tp", "2", "--random-weights"], "not supported together yet"),
    (["bench", "decode", "--compile", "eager", "--plot", "/no/such/dir/p.png"], "does not exist"),
    (["demo", "--sweep-contexts", "4"], "must exceed the decode steps"),
    (["demo", "--no-sweep", "--plot", "{tmp}/p.png"], "cannot go with --no-sweep"),
    (["demo", "--sweep-contexts", "1K,x"], "cannot read 'x'"),
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


def test_prefilled_cache_with_sliding_layers_is_not_rewound(model):
    """A sliding-window layer's decode writes roll its rows away, so a shared prefill would not restore the prompt:
    refused (and ``bench decode`` / the demo then prefill each run themselves)."""
    from types import SimpleNamespace

    from dsc.generation import Prefilled

    ids = torch.zeros(1, 4, dtype=torch.long)
    cache = SimpleNamespace(layers=[SimpleNamespace(is_sliding=False), SimpleNamespace(is_sliding=True)])
    shared = Prefilled(cache, torch.zeros(1, 8), 4, 0.0)
    assert not shared.rewindable
    with pytest.raises(ValueError, match="sliding-window layers cannot be rewound"):
        greedy_decode(model, ids, 2, prefilled=shared)
