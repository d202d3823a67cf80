"""Issue 15, reach: every way HF users run a model gets Double Sparsity or says loudly why not (tiny models,
eager inner compiler)."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

import dsc
from helpers import CHANNELS, generate, tiny
from helpers import compiled_tiny as compiled

pytestmark = pytest.mark.usefixtures("clean_dynamo")

OPTS = dict(channels=CHANNELS, inner="eager", dense_layers=(0,), r=8)


def test_hf_compile_config_with_its_default_mode():
    """``generate(compile_config=CompileConfig(backend=dsc.sparse_backend(...)))`` with HF's default mode
    (reduce-overhead; on the CPU it changes nothing): HF compiles the decode steps (its prefill stays eager, so
    the labels are built from the cache at the first compiled step), exact at full budget."""
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    ref = generate(model, ids, 5, "static")
    backend = dsc.sparse_backend(budget=256, **OPTS)
    config = T.CompileConfig(backend=backend)
    config._compile_all_devices = True  # HF compiles generate on accelerators only unless told
    assert config.mode == "reduce-overhead"
    out = generate(model, ids, 5, "static", compile_config=config)
    assert out.sequences.tolist() == ref.sequences.tolist()
    rt = dsc.runtime_of(backend)
    assert rt.stats["sparse_calls"] == 4 * 2  # 4 compiled decode steps x 2 sparse layers
    assert rt.stats["label_builds"] == 2  # the eager prefill's cache labelled once per sparse layer, then continued


def test_sparse_backend_validates_early_and_keeps_its_options():
    with pytest.raises(ValueError, match="unknown dsparse option"):
        dsc.sparse_backend(channels=CHANNELS, budgett=3)
    with pytest.raises(ValueError, match="channel config"):
        dsc.sparse_backend(budget=3)
    backend = dsc.sparse_backend(budget=3, **OPTS)
    with pytest.raises(ValueError, match="options bound"):
        backend(None, [], options={"budget": 4})


def test_cuda_graph_modes_are_refused_on_cuda_unless_opted_in():
    """A CUDA-graph mode replays kernels without the site op's host code: refused on CUDA, with the opt-in named;
    with ``cuda_graphs=True`` accepted, with a warning that it is experimental."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dsc.backend import _refuse_cuda_graphs

    with FakeTensorMode(allow_non_fake_inputs=True):
        on_cuda = [torch.empty(2, device="cuda")]
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        _refuse_cuda_graphs("reduce-overhead", on_cuda, False)
    with pytest.warns(RuntimeWarning, match="experimental"):
        _refuse_cuda_graphs("reduce-overhead", on_cuda, True)
    _refuse_cuda_graphs("default", on_cuda, False)
    _refuse_cuda_graphs("reduce-overhead", [torch.empty(2)], False)  # CPU: inductor's CUDA graphs do not apply


@pytest.mark.parametrize("impl", ["eager", "flex_attention"])
def test_non_sdpa_attention_warns_with_the_fix_and_dsc_compile_switches(impl):
    model = tiny("llama")
    model.set_attn_implementation(impl)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    with pytest.warns(RuntimeWarning, match="without scaled_dot_product_attention.*attn_implementation='sdpa'"):
        with compiled(model, budget=256) as rt:
            generate(model, ids, 2)
    assert rt.reports and not any(rt.reports) and not rt.stats  # graphs compiled, no site found, nothing ran
    torch._dynamo.reset()
    ref = generate(model, ids, 3)
    with pytest.warns(RuntimeWarning, match=f"switched the model from attn_implementation='{impl}'"):
        dsc.compile(model, budget=256, **OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent-dense warning now
        out = generate(model, ids, 3)
    assert dsc.runtime_of(model).stats["sparse_calls"] == 2 * 2
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_regional_compilation_names_layers_by_their_cache(cache):
    """``layer.compile(...)`` per decoder layer (PyTorch's cold-start advice): the module path inside a layer has no
    layer number, but the cache layer its keys are read from does (HF's layer_idx). Decode steps are sparse and
    exact at full budget; with a binding budget they equal the whole-model compile."""
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    runs = {}
    for how in ("whole", "regional"):
        for budget in (256, 6):
            model = tiny("llama")
            torch._dynamo.reset()
            opts = dict(budget=budget, sink=1, recent=2, **OPTS)
            if how == "whole":
                model.compile(backend="dsparse", options=opts)
            else:
                for layer in model.model.layers:
                    layer.compile(backend="dsparse", options=opts, isolate_recompiles=True)
            runs[how, budget] = generate(model, ids, 4, cache).sequences.tolist()
            rt = dsc.runtime_of(opts)  # one runtime for every graph compiled with these options (each layer's)
            assert rt.stats["sparse_calls"] == 3 * 2  # 3 decode steps x 2 sparse layers
            assert {s.layer for rep in rt.reports for s in rep if s.action == "sparse"} == {1, 2}
    assert runs["regional", 256] == runs["whole", 256] == generate(tiny("llama"), ids, 4, cache).sequences.tolist()
    assert runs["regional", 6] == runs["whole", 6]


@pytest.mark.parametrize("hooks", ["cpu_offload", "dispatch_model"])
def test_accelerate_hooks_with_dsc_compile(hooks):
    """accelerate's hooks break the graph at every module (and hide the module path): dsc.compile raises the
    recompile budget with the number of hooked modules, layers are named by their cache layer; decode is sparse,
    exact at full budget and equal to the whole-model compile at a binding budget."""
    import accelerate

    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    ref = generate(tiny("llama"), ids, 4, "dynamic").sequences.tolist()
    whole = tiny("llama")
    whole.compile(backend="dsparse", options=dict(budget=6, sink=1, recent=2, **OPTS))
    binding = generate(whole, ids, 4, "dynamic").sequences.tolist()
    for budget, want in ((256, ref), (6, binding)):  # exact at full budget; at a binding one, as the whole compile
        torch._dynamo.reset()
        model = tiny("llama")
        if hooks == "cpu_offload":
            accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        else:
            parts = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"] + [
                f"model.layers.{i}" for i in range(len(model.model.layers))]
            model = accelerate.dispatch_model(model, device_map=dict.fromkeys(parts, "cpu"), main_device="cpu",
                                              force_hooks=True)
        dsc.compile(model, budget=budget, sink=1, recent=2, **OPTS)
        assert generate(model, ids, 4, "dynamic").sequences.tolist() == want
        assert dsc.runtime_of(model).stats["sparse_calls"] == 3 * 2
