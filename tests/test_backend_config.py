"""DSConfig validation and the backend's entry: options, errors, ``mode=``, the entry point."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import dsc
from dsc.backend import dsparse
from dsc.calibration.config import ChannelConfig
from dsc.config import DSConfig, Selection, parse_budget

CH = ChannelConfig.random(2, 4, 2, 16, seed=0)


def test_lazy_exports():
    assert dsc.DSConfig is DSConfig
    from dsc.passes.explain import explain

    assert dsc.explain is explain


def test_unknown_option_names_are_errors():
    with pytest.raises(ValueError, match=r"unknown dsparse option\(s\) \['bugdet'\].*known options"):
        DSConfig.from_options({"channels": CH, "bugdet": 0.1})
    with pytest.raises(ValueError, match="must be a dict or a DSConfig"):
        DSConfig.from_options([("budget", 1)])


def test_options_from_dict_dataclass_and_base_with_overrides():
    base = DSConfig(channels=CH, budget=32, dense_layers=[1, 0, 1])
    assert base.dense_layers == (0, 1)
    assert DSConfig.from_options(base) is base
    cfg = DSConfig.from_options({"config": base, "budget": 0.25})
    assert (cfg.budget_tokens, cfg.budget_frac, cfg.channels) == (4 + 16 + 16, 0.25, CH)  # a fraction's floor
    assert DSConfig.from_options({"channels": CH, "budget": 16.0}).budget == 16  # integral float -> tokens
    with pytest.raises(ValueError, match=r"options\['config'\] must be a DSConfig"):
        DSConfig.from_options({"config": {"budget": 3}})


@given(st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.floats(min_value=1.01, max_value=1e6).filter(
    lambda x: x != int(x)), st.integers(max_value=0), st.booleans(), st.just(float("inf"))))
def test_bad_budgets_rejected(budget):
    with pytest.raises(ValueError, match="budget"):
        DSConfig(channels=CH, budget=budget)


@given(st.one_of(st.integers(min_value=1, max_value=10**6), st.floats(min_value=1e-6, max_value=1.0)))
@example(1.0)   # a fraction: every token
@example(1)     # an int: one token
def test_good_budgets_split_into_tokens_or_fraction(budget):
    """An int is tokens (no fraction); a fraction in (0, 1] keeps its share with a floor of sink + recent + 16."""
    cfg = DSConfig(channels=CH, budget=budget)
    if isinstance(budget, int):
        assert (cfg.budget_tokens, cfg.budget_frac) == (budget, 0.0)
    else:
        assert (cfg.budget_tokens, cfg.budget_frac) == (cfg.sink + cfg.recent + 16, budget)
        n = cfg.dense_below + 10
        assert cfg.tokens_kept(n) == max(cfg.budget_tokens, math.ceil(budget * n))
        assert cfg.tokens_kept(cfg.dense_below - 1) == cfg.dense_below - 1  # below it: dense, every token


@pytest.mark.parametrize("text,value", [("128", 128), ("1/16", 1 / 16), ("0.0625", 0.0625), ("1.0", 1.0), ("2.0", 2),
                                        (" 7 ", 7)])
def test_one_budget_parser(text, value):
    assert parse_budget(text) == value and type(parse_budget(text)) is type(value)


@pytest.mark.parametrize("text", ["1.5", "0", "-1/16", "x", "1/0", "inf"])
def test_budget_parser_refuses_instead_of_truncating(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


def test_short_caches_attend_densely_by_default():
    """Below where the fraction binds (its floor / f) a cache attends densely; min_length overrides."""
    assert DSConfig(channels=CH, budget=1 / 16).dense_below == 36 * 16
    assert DSConfig(channels=CH, budget=1 / 16, min_length=0).dense_below == 0
    assert DSConfig(channels=CH, budget=64).dense_below == 0


@pytest.mark.parametrize("field,value,match", [("label_bits", 8.0, "label_bits"), ("r", 17, "head_dim"),
                                               ("dense_layers", [5], "out of range"),
                                               ("sync_layers", [9], "out of range")])
def test_config_errors_before_any_tracing(field, value, match):
    with pytest.raises(ValueError, match=match):
        DSConfig(channels=CH, predict=field == "sync_layers", offload=field == "sync_layers", **{field: value})


@pytest.mark.parametrize("field,value", [("label_bits", 12), ("gqa", "kv"), ("prefill", "auto"), ("inner", "tvm"),
                                         ("r", 0), ("sink", -1), ("dense_layers", ["x"]), ("channels", {"a": 1}),
                                         ("zero_copy", 1), ("measure_overlap", "yes"), ("min_length", -1),
                                         ("recent", 1.0), ("inductor_options", [])])
def test_bad_fields_name_themselves(field, value):
    with pytest.raises(ValueError, match=f"DSConfig.{field}"):
        DSConfig(**{"channels": CH, field: value})


def test_channels_from_a_json_path(tmp_path):
    path = CH.save(tmp_path / "cfg.json")
    cfg = DSConfig(channels=str(path))
    assert cfg.channels == CH


def _gm():
    def f(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v) * 2

    return torch.fx.symbolic_trace(f)


def test_missing_channel_config_says_how_to_calibrate():
    with pytest.raises(ValueError, match="needs a channel config.*dsc.calibrate.*dsc calibrate"):
        dsparse(_gm(), [], options=None)

    def f(x):
        return x + 1

    fn = torch.compile(f, backend="dsparse")  # the entry point resolves the string
    with pytest.raises(Exception, match="needs a channel config"):
        fn(torch.ones(2))


def test_mode_patches_inductor_and_graphs_without_decode_sites_pass_through(monkeypatch):
    """``mode`` reaches the inner inductor compile as its config patches (``inductor_options`` win over them); a
    CUDA-graph mode is accepted for CPU inputs (inductor's CUDA graphs do not apply there) and computes what eager
    does. A graph whose SDPA site cannot decode (here: no shapes) passes through dense."""
    import torch._inductor.compile_fx as inductor

    real, patches, depth = inductor.compile_fx, [], [0]

    def compile_fx(gm, example_inputs, config_patches=None, **kw):
        if not depth[0]:  # the backend's call (compile_fx calls itself again with the patches applied)
            patches.append(config_patches)
        depth[0] += 1
        try:
            return real(gm, example_inputs, config_patches=config_patches, **kw)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(inductor, "compile_fx", compile_fx)
    q = torch.randn(1, 2, 3, 8)
    opts = {"channels": CH, "inner": "inductor", "inductor_options": {"max_autotune": False}}
    modes = (None, "default", "reduce-overhead", "max-autotune-no-cudagraphs")
    for mode in modes:
        compiled = dsparse(_gm(), [q, q, q], mode=mode, options=opts)
        torch.testing.assert_close(compiled(q, q, q), _gm()(q, q, q))
    assert patches == [{"max_autotune": False}, {"max_autotune": False},
                       {"triton.cudagraphs": True, "max_autotune": False},
                       {"max_autotune": False, "coordinate_descent_tuning": True}]
    # symbolic_trace graphs carry no shapes: the site is found and kept dense, with the reason.
    reports = dsc.runtime_of(opts).reports  # one runtime for every graph compiled with these options
    assert len(reports) == len(modes) and all(len(sites) == 1 and sites[0].action == "dense" for sites in reports)
    assert "no shape information" in reports[-1][0].reason


def test_selection_is_the_configs_selection_knobs():
    """DSConfig.selection: the validated selection knobs (r and gqa resolved), equal to a Selection built alike."""
    cfg = DSConfig(channels=CH, budget="1/8", sink=2, recent=3, label_bits=4, min_length=7)
    want = Selection(budget=0.125, r=CH.head_dim // 4, label_bits=4, sink=2, recent=3, gqa="group", min_length=7)
    assert cfg.selection == want  # per KV group by default (issue 14), with or without offload
    assert DSConfig(channels=CH, offload=True).selection.gqa == "group"
    assert DSConfig(channels=CH, gqa="head").selection.gqa == "head"
    for name in ("budget_tokens", "budget_frac", "dense_below"):
        assert getattr(cfg, name) == getattr(want, name)
    assert [cfg.tokens_kept(n) for n in (3, 7, 40, 400)] == [want.tokens_kept(n) for n in (3, 7, 40, 400)] \
        == [3, 7, 2 + 3 + 16, 50]
    assert cfg.budget_text() == want.budget_text() == "0.125 of valid tokens (at least 21)"
    assert (DSConfig().zero_copy, DSConfig().measure_overlap) == (True, False)


@pytest.mark.parametrize("field,value,match", [("r", 0, "Selection.r must be an int >= 1"),
                                               ("gqa", "kv", "Selection.gqa must be one of"),
                                               ("label_bits", 16.0, "Selection.label_bits must be one of the ints"),
                                               ("budget", 0, "Selection.budget"),
                                               ("min_length", "5", "Selection.min_length")])
def test_selection_validates_like_the_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        Selection(**{field: value})
    with pytest.raises(ValueError, match=match.replace("Selection.", "DSConfig.")):
        DSConfig(**{field: value})


def test_policy_holds_the_same_selection():
    """The evaluation Policy validates through Selection and hands the backend the same knobs."""
    from dataclasses import replace

    from dsc.evaluation.policies import Policy

    p = Policy("dsparse", budget=64, r=8, gqa="group", sink=1, recent=2, channels=CH, dense_layers=(1, 0))
    assert DSConfig.from_options(p.backend_options()).selection == p.selection
    assert (p.budget, p.r, p.gqa, p.dense_layers) == (64, 8, "group", (0, 1))
    assert Policy("streaming", channels=CH).r == CH.head_dim // 4 and Policy("streaming").r == 16
    assert replace(p, budget="1/4").selection == replace(p.selection, budget=0.25)
    with pytest.raises(ValueError, match="Selection.r must be an int >= 1"):
        Policy("sparq", r=0)
    with pytest.raises(ValueError, match="Policy.page must be an int >= 1"):
        Policy("quest", page=0)
