"""DSConfig validation and the backend's entry: options, errors, ``mode=``, the entry point."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dsc
from dsc.backend import REPORTS, dsparse
from dsc.calibration.config import ChannelConfig
from dsc.config import DSConfig

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
    assert (cfg.budget_tokens, cfg.budget_frac, cfg.channels) == (0, 0.25, CH)
    assert DSConfig.from_options({"channels": CH, "budget": 16.0}).budget == 16  # integral float -> tokens
    with pytest.raises(ValueError, match=r"options\['config'\] must be a DSConfig"):
        DSConfig.from_options({"config": {"budget": 3}})


@given(st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.floats(min_value=1.01, max_value=1e6).filter(
    lambda x: x != int(x)), st.integers(max_value=0), st.booleans(), st.just(float("inf"))))
def test_bad_budgets_rejected(budget):
    with pytest.raises(ValueError, match="budget"):
        DSConfig(channels=CH, budget=budget)


@given(st.one_of(st.integers(min_value=1, max_value=10**6), st.floats(min_value=1e-6, max_value=0.999)))
def test_good_budgets_split_into_tokens_or_fraction(budget):
    cfg = DSConfig(channels=CH, budget=budget)
    assert (cfg.budget_tokens > 0) != (cfg.budget_frac > 0)


@pytest.mark.parametrize("field,value", [("label_bits", 12), ("gqa", "kv"), ("prefill", "auto"), ("inner", "tvm"),
                                         ("r", 0), ("sink", -1), ("dense_layers", ["x"]), ("channels", {"a": 1})])
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


def test_mode_is_accepted_and_graphs_without_sdpa_pass_through():
    q = torch.randn(1, 2, 3, 8)
    n0 = len(REPORTS)
    for mode in (None, "default", "max-autotune-no-cudagraphs"):
        compiled = dsparse(_gm(), [q, q, q], mode=mode, options={"channels": CH, "inner": "eager"})
        torch.testing.assert_close(compiled(q, q, q), _gm()(q, q, q))
    # symbolic_trace graphs carry no shapes: the site is found and kept dense, with the reason.
    sites = REPORTS[-1]
    assert len(REPORTS) - n0 == 3 and len(sites) == 1 and sites[0].action == "dense"
    assert "no shape information" in sites[0].reason
    assert torch._inductor.list_mode_options("max-autotune-no-cudagraphs")  # what _inner patches inductor with
