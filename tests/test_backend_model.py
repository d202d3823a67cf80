"""The dsparse backend on the embedded SmolLM2-135M (30 layers, GQA 9/3): exact at a budget >= the length with
static (inductor) and dynamic (eager inner compiler) caches; at a 1/8 budget the sparse kernel runs on every sparse layer
and step and the continuation stays fluent. Each compile happens once (minutes on 2 cores)."""
from __future__ import annotations

import contextlib

import pytest
import torch

import dsc
from dsc.assets import cache_dir, calibration_essays, essay_text
from dsc.generation import greedy_decode

pytestmark = pytest.mark.slow
DENSE_LAYERS = (0, 1)


@pytest.fixture(scope="module")
def channels(model, tokenizer):
    """A real calibration (1K tokens, cached like examples/quickstart.py does)."""
    path = cache_dir() / "configs" / "smollm2-qk-1024.json"
    if path.exists():
        return dsc.ChannelConfig.load(path)
    cfg = dsc.calibrate(model, calibration_essays(), tokenizer=tokenizer, tokens=1024, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg.save(path)
    return cfg


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return tokenizer(essay_text("evaluation"), return_tensors="pt").input_ids[:, :256]


@pytest.fixture(autouse=True, scope="module")
def _dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch._dynamo.reset()


@contextlib.contextmanager
def compiled(model, **options):
    """Compile a wrapper (``model.forward``) for generate to pick up; the shared model is restored after. Yields the
    compile's runtime (its counters start at zero)."""
    backend = dsc.sparse_backend(**options)
    model.forward = torch.compile(model.forward, backend=backend)
    try:
        yield backend.runtime
    finally:
        del model.forward


def generate(model, ids, n, kind):
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    if kind == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        return model.generate(ids, **kw)


@pytest.mark.parametrize("kind,inner", [("static", "inductor"), ("dynamic", "eager")])
def test_full_budget_is_exact(model, channels, prompt, kind, inner):
    ids = prompt[:, :48]
    ref = generate(model, ids, 6, kind)
    with compiled(model, channels=channels, budget=4096, inner=inner, dense_layers=DENSE_LAYERS) as rt:
        out = generate(model, ids, 6, kind)
    assert rt.stats["sparse_calls"] == 5 * (30 - len(DENSE_LAYERS))
    assert rt.stats["label_rebuilds"] == 0
    assert out.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-3)


def _nll(model, ids, n_new):
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -n_new - 1:-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, -n_new:]).item()


def test_eighth_budget_runs_sparse_and_stays_fluent(model, tokenizer, channels, prompt):
    n = 10
    ref = generate(model, prompt, n, "static")
    # 256 tokens lie below the default dense_below of 1/8 (288): min_length=0 makes every step sparse
    opts = dict(channels=channels, budget=1 / 8, inner="eager", dense_layers=DENSE_LAYERS, min_length=0)
    with compiled(model, **opts) as rt:
        out = generate(model, prompt, n, "static")
    assert rt.stats["sparse_calls"] == (n - 1) * (30 - len(DENSE_LAYERS))
    dense_text = tokenizer.decode(ref.sequences[0, prompt.shape[1]:])
    sparse_text = tokenizer.decode(out.sequences[0, prompt.shape[1]:])
    print(f"dense : {dense_text!r}\nsparse: {sparse_text!r}")
    # Fluent: the dense model finds the sparse continuation about as likely as its own.
    nll_dense, nll_sparse = _nll(model, ref.sequences, n), _nll(model, out.sequences, n)
    print(f"dense-model NLL per token: dense continuation {nll_dense:.3f}, sparse continuation {nll_sparse:.3f}")
    assert nll_sparse <= nll_dense + 1.0
    assert sum(c.isalpha() or c.isspace() for c in sparse_text) >= 0.7 * len(sparse_text)
    ex = dsc.explain(model, {"input_ids": prompt[:, :16], "attention_mask": torch.ones_like(prompt[:, :16])}, opts,
                     max_new_tokens=2, cache_implementation="static")
    print(ex)
    assert ex.counts() == {"sites": 60, "sparse": 56, "dense": 4}


def test_short_chat_prompt_answers_like_dense(model, tokenizer, channels):
    """Issue 12 case 1: the README's options (budget 1/16, sink 4, recent 16) on a short chat prompt once attended
    only the first tokens (1/16 of 40 = 3 slots, all sinks, not even the current token) and answered garbage. Now
    such a cache is below the budget's dense_below and attends densely, and even forced sparse (min_length=0) the
    fraction's floor keeps the current token, the recent window and 16 scored tokens."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] < 64
    ref = generate(model, ids, 8, "dynamic")
    assert "Paris" in tokenizer.decode(ref.sequences[0, ids.shape[1]:])
    for min_length, sparse in ((None, False), (0, True)):
        with compiled(model, channels=channels, budget=1 / 16, inner="eager", min_length=min_length) as rt:
            out = generate(model, ids, 8, "dynamic")
        # 7 decode steps x 28 sparse layers (DSConfig's default dense layers 0, 1): all sparse, or all dense
        assert rt.stats["sparse_calls"] == (7 * 28 if sparse else 0), rt.stats
        assert out.sequences.tolist() == ref.sequences.tolist(), tokenizer.decode(out.sequences[0, ids.shape[1]:])


def test_shared_prefill_decodes_as_its_own_prefill(model, channels, prompt):
    """``dsc bench decode`` and the demo prefill a prompt once (identical rows run as one, the cache widened) and
    decode every configuration from that cache, rewound: dense and dsparse tokens equal those of decodes that
    prefill for themselves, run after run (the dsparse runtime labels the cache it first sees)."""
    from dsc.bench.decode import compiled_forward
    from dsc.generation import prefill

    ids = prompt[:, :200].expand(2, -1).contiguous()
    shared = prefill(model, ids, 6)
    assert shared.cache.layers[0].keys.shape[0] == 2
    for policy, options in (("dense", None), ("dsparse", {"channels": channels, "budget": 64})):
        torch._dynamo.reset()
        own = greedy_decode(model, ids, 6, forward=compiled_forward(model, "eager", policy, options))
        for _ in range(2):
            torch._dynamo.reset()
            forward = compiled_forward(model, "eager", policy, options)
            again = greedy_decode(model, ids, 6, forward=forward, prefilled=shared)
            assert torch.equal(again.tokens, own.tokens), policy
            if policy == "dsparse":
                assert dsc.runtime_of(forward).stats["sparse_calls"] > 0
    with pytest.raises(ValueError, match="prefilled holds 2 x 200"):
        greedy_decode(model, ids[:1], 6, prefilled=shared)
