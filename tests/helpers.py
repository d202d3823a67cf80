"""Shared test helpers (plain functions, no fixtures): randomly initialised tiny HF decoders, greedy generation
that returns tokens and logits, and a comparison of two generations. Test modules import from here, never from
each other."""
from __future__ import annotations

import contextlib

import torch
import transformers as T

HQ, HKV, HIDDEN = 4, 2, 64
D = HIDDEN // HQ


def tiny_decoder(config_cls, model_cls, layers: int, **overrides):
    """A tiny ``model_cls`` (eval mode, SDPA attention, seeded weights): 4 query / 2 KV heads of 16 channels."""
    cfg = config_cls(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
                     num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=256,
                     bos_token_id=1, eos_token_id=2, **overrides)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_cls(cfg).eval()


def generate(model, ids, n: int, kind: str = "dynamic", **kw):
    """Exactly ``n`` greedy tokens with their logits; ``kind="static"`` asks HF for a static cache."""
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True,
              pad_token_id=0, **kw)
    if kind == "static":
        kw.setdefault("cache_implementation", "static")
    with torch.no_grad():
        return model.generate(ids, **kw)


def assert_same(ref, out, atol: float = 1e-4) -> None:
    """Same tokens, and logits equal within ``atol``."""
    assert ref.sequences.tolist() == out.sequences.tolist()
    assert len(ref.logits) == len(out.logits)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-4)


@contextlib.contextmanager
def compiled(model, options: dict):
    """``model.forward`` compiled with the dsparse backend and ``options`` for the duration; restored after. Yields
    the compile's runtime (:class:`dsc.passes.runtime.Runtime`: its counters ``.stats``, site reports ``.reports``),
    which starts empty: nothing in it comes from another compile."""
    import dsc

    backend = dsc.sparse_backend(**options)
    model.forward = torch.compile(model.forward, backend=backend)
    try:
        yield backend.runtime
    finally:
        del model.forward


GEMMA3 = (T.Gemma3TextConfig, T.Gemma3ForCausalLM)
MISTRAL = (T.MistralConfig, T.MistralForCausalLM)
QWEN2 = (T.Qwen2Config, T.Qwen2ForCausalLM)
