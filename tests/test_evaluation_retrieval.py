"""Retrieval tasks (deterministic cases, policy runs from one prefilled cache) and the sweep command."""
from __future__ import annotations

import csv
import json
import sys

import pytest

from dsc.evaluation import retrieval as R
from dsc.evaluation.policies import Policy


def test_cases_are_deterministic_and_well_formed(tokenizer):
    a = R.passkey_case(tokenizer, 400, 0.25, 7)
    assert a == R.passkey_case(tokenizer, 400, 0.25, 7)
    assert a.answer != R.passkey_case(tokenizer, 400, 0.25, 8).answer or \
        a.context != R.passkey_case(tokenizer, 400, 0.25, 8).context
    key = a.answer.strip()
    assert len(key) == 5 and a.context.count(key) == 2
    n = len(tokenizer(a.context).input_ids)
    assert 340 <= n <= 400
    at = a.context.index("The pass key is")
    assert 0.15 < at / len(a.context) < 0.4  # needle near the requested depth
    b = R.lines_case(tokenizer, 600, 0.9, 3)
    assert b == R.lines_case(tokenizer, 600, 0.9, 3)
    name = b.question.split("line ")[1].split("?")[0]
    lines = b.context.splitlines()[1:]
    assert len({ln.split(":")[0] for ln in lines}) == len(lines)  # unique names
    hit = [i for i, ln in enumerate(lines) if ln.startswith(f"line {name}:")]
    assert len(hit) == 1 and lines[hit[0]].endswith(f"<{b.answer}>")
    assert hit[0] / len(lines) > 0.8
    assert len(tokenizer(b.context).input_ids) <= 600


def test_first_number():
    assert R.first_number(" 12345. ok") == "12345" and R.first_number("none") is None


def test_run_case_policies(model, tokenizer):
    case = R.passkey_case(tokenizer, 160, 0.5, 0)
    pols = [Policy("dense"), Policy("streaming", budget=512), Policy("streaming", budget=8, sink=2)]
    rows = R.run_case(model, tokenizer, case, pols, max_new=4)
    assert [r["policy"] for r in rows] == ["dense", "streaming", "streaming"]
    dense, full, tiny = rows
    assert full["logprob"] == pytest.approx(dense["logprob"], abs=1e-3) and full["agree"] == 1.0
    assert full["output"] == dense["output"]
    assert abs(tiny["logprob"] - dense["logprob"]) > 1e-2  # the question/answer rows really are sparse
    summary = R.summarize(rows, by=("policy", "label"))
    assert {s["label"] for s in summary} == {p.label() for p in pols}
    by_label = {r["label"]: r for r in rows}
    assert all(s["cases"] == 1 and s["agree"] == by_label[s["label"]]["agree"] for s in summary)
    assert dense["agree"] == 1.0  # dense agrees with itself
    assert (tiny["agree"] == 1.0) == (tiny["output"] == dense["output"])


def test_summarize_means_by_hand():
    """summarize: per group, mean agreement/accuracy/log-prob, the gap to dense relative to dense's log-prob, and
    'kept' over the cases dense got right; checked on rows whose answers are known."""
    def row(policy, seed, correct, logprob, agree):
        return {"task": "passkey", "length": 100, "depth": 0.5, "seed": seed, "policy": policy, "label": policy,
                "correct": correct, "logprob": logprob, "agree": agree}

    rows = [row("dense", 0, True, -2.0, 1.0), row("dense", 1, False, -6.0, 1.0),
            row("s", 0, False, -3.0, 0.25), row("s", 1, False, -5.0, 0.75)]
    (d, s) = sorted(R.summarize(rows, by=("policy",)), key=lambda x: x["policy"])
    assert (s["cases"], s["agree"], s["accuracy"], s["logprob"]) == (2, 0.5, 0.0, -4.0)
    assert s["logprob_gap"] == pytest.approx((1.0 + 1.0) / 8.0) and s["kept"] == 0.0  # dense right on seed 0 only
    assert (d["agree"], d["accuracy"], d["kept"], d["logprob_gap"]) == (1.0, 0.5, 1.0, 0.0)


def test_cli_retrieval(tmp_path):
    from dsc.cli import main

    path = tmp_path / "r.json"
    assert main(["eval", "retrieval", "--task", "lines", "--lengths", "128", "--depths", "0.5", "--samples", "1",
                 "--policy", "streaming", "--budget", "16", "--max-new", "3", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert len(res["cases"]) == 2 and {r["policy"] for r in res["cases"]} == {"dense", "streaming"}
    assert main(["eval", "retrieval", "--task", "needle"]) == 2
    assert main(["eval", "retrieval", "--depths", "1.5"]) == 2


def test_cli_sweep(tmp_path):
    from dsc.cli import main

    png = tmp_path / "s.png"
    assert main(["eval", "sweep", "--plot", str(png), "--context", "64", "--windows", "1", "--budgets", "1/2,1/4",
                 "--bytes", "1/2", "--policy", "streaming,quest", "--task", "passkey", "--lengths", "128",
                 "--depths", "0.5", "--max-new", "2"]) == 0
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(png.with_suffix(".json").read_text())
    assert {(r["policy"], r["mode"]) for r in data["ppl"]} == {
        ("streaming", "tokens"), ("streaming", "bytes"), ("quest", "tokens"), ("quest", "bytes")}
    assert {s["policy"] for s in data["retrieval"]} == {"dense", "streaming", "quest"}
    rows = list(csv.reader(png.with_suffix(".csv").open()))
    assert rows[0][0] == "mode" and rows[1][0] == "dense" and len(rows) > 6
    # --merge: sweeps split across processes become one plot; incomparable ones are refused
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**data, "ppl": data["ppl"][:1], "retrieval": []}))
    merged = tmp_path / "m.png"
    assert main(["eval", "sweep", "--plot", str(merged), "--merge", str(png.with_suffix(".json")), str(other)]) == 0
    assert len(json.loads(merged.with_suffix(".json").read_text())["ppl"]) == len(data["ppl"]) + 1
    other.write_text(json.dumps({**data, "dense": {**data["dense"], "ppl": data["dense"]["ppl"] * 2}}))
    assert main(["eval", "sweep", "--plot", str(merged), "--merge", str(png.with_suffix(".json")), str(other)]) == 2


def test_sweep_without_matplotlib(tmp_path, monkeypatch):
    from dsc.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["eval", "sweep", "--plot", str(tmp_path / "x.png")]) == 2


def test_generate_rows_through_the_compiled_backend(model, tokenizer, monkeypatch):
    """At a budget above the context, generate() on the dsparse-compiled model answers exactly as dense."""
    import torch

    from dsc.calibration.config import ChannelConfig

    c = model.config
    chans = ChannelConfig.random(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                                 c.hidden_size // c.num_attention_heads, seed=0)
    case = R.passkey_case(tokenizer, 160, 0.5, 0)
    import dsc

    options, backend_options = [], Policy.backend_options  # the options generate_rows compiles with
    monkeypatch.setattr(Policy, "backend_options", lambda self, **kw: options.append(backend_options(self, **kw))
                        or options[-1])
    torch._dynamo.reset()
    try:
        rows = R.generate_rows(model, tokenizer, [case], Policy("dsparse", budget=4096, channels=chans), max_new=3,
                               progress=False)
        rt = dsc.runtime_of(options[0])  # the runtime of that compile (alive while its graphs are)
    finally:
        torch._dynamo.reset()
    assert "forward" not in model.__dict__  # the shared model is left uncompiled
    assert rt.stats["sparse_calls"] == 2 * (c.num_hidden_layers - 2)  # 2 decode steps ran the sparse op per layer
    (row,) = rows
    assert row["agree"] == 1.0 and row["output"] == row["dense_output"]
    assert row["correct"] == row["dense_correct"] and "compiled generate" in row["label"]
