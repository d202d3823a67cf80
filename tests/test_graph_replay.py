"""The static-cache decode step replayed as a CUDA graph would replay it (tests/graph_replay.py: the recorded ops
re-run on the same memory, no host code), on the CPU with ``device_sync=True`` (the GPU's path: label bookkeeping
in ``dsc::label_sync``, no host reads): the replayed tokens and logits are the non-graph decode's, also after a
new sequence is prefilled outside the compiled model into the same cache (the labels are rebuilt on the device,
inside the replayed step)."""
import pytest
import torch
import transformers as T

from graph_replay import Recording, record_inside_graphs
from helpers import HKV, LAYERS, compiled_tiny, tiny

pytestmark = pytest.mark.usefixtures("clean_dynamo")

BINDING = dict(budget=6, sink=1, recent=2, dense_layers=(0,))  # 6 of 12+ tokens: the selection matters


def _decode(forward, first_logits, cache, start: int, n: int):
    """Greedy tokens and last logits of ``n`` plain decode steps from position ``start``."""
    tokens, logits = [], first_logits
    for i in range(n):
        tok = logits[:, -1:].argmax(-1)
        tokens.append(tok)
        logits = forward(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([start + i])).logits
    return torch.cat(tokens, 1), logits


def _prefill(forward, ids, cache):
    return forward(input_ids=ids, past_key_values=cache, cache_position=torch.arange(ids.shape[1])).logits


def _replayed(forward, first_logits, cache, start: int, n: int, recording=None):
    """The same decode with one step recorded (unless ``recording`` is given) and every later step replayed: the
    inputs are copied into the recorded step's input tensors, as into a CUDA graph's static inputs."""
    ids = first_logits[:, -1:].argmax(-1)
    pos = torch.tensor([start])
    if recording is None:
        recording = Recording()
        with recording.arm():
            recording.logits = forward(input_ids=ids, past_key_values=cache, cache_position=pos).logits
        recording.inputs = (ids, pos)
        tokens, n, start, logits = [ids.clone()], n - 1, start + 1, recording.logits
    else:
        tokens, logits = [], first_logits
    for i in range(n):
        tok = logits[:, -1:].argmax(-1)
        tokens.append(tok)
        recording.inputs[0].copy_(tok)
        recording.inputs[1].fill_(start + i)
        recording.replay()
        logits = recording.logits
    return torch.cat(tokens, 1), logits.clone(), recording


@pytest.mark.parametrize("bits", [16, 4])
def test_static_decode_step_replays_like_the_plain_decode(bits, monkeypatch):
    record_inside_graphs(monkeypatch)
    model = tiny("llama")
    gen = torch.Generator().manual_seed(3)
    seq_a, seq_b = torch.randint(3, 128, (2, 20), generator=gen), torch.randint(3, 128, (2, 14), generator=gen)
    eager = model.forward
    with torch.no_grad(), compiled_tiny(model, device_sync=True, label_bits=bits, **BINDING) as rt:
        want_a, want_b = _plain(model, seq_a, 8), _plain(model, seq_b, 6)

        cache = _cache(model)
        first = _prefill(model.forward, seq_a, cache)
        warm, logits = _decode(model.forward, first, cache, 20, 1)  # a warm-up step (CUDA graph trees run one)
        got, got_logits, recording = _replayed(model.forward, logits, cache, 21, 7)
        assert recording.graphs == 1
        assert "dsc.label_sync.default" in recording.names() and "dsc.ds_decode.default" in recording.names()
        assert torch.equal(torch.cat([warm, got], 1), want_a[0])
        torch.testing.assert_close(got_logits, want_a[1], atol=1e-5, rtol=1e-5)
        assert rt.labels.device_rebuilds() == 0

        cache.reset()  # sequence B prefilled outside the compiled model into the same buffers, then replays only
        first_b = eager(input_ids=seq_b, past_key_values=cache, cache_position=torch.arange(14)).logits
        got_b, got_b_logits, _ = _replayed(model.forward, first_b, cache, 14, 6, recording)
    assert torch.equal(got_b, want_b[0])
    torch.testing.assert_close(got_b_logits, want_b[1], atol=1e-5, rtol=1e-5)
    assert rt.labels.device_rebuilds() == (LAYERS - 1) * 2 * HKV  # once per sparse layer, batch row and KV head


def _cache(model):
    return T.StaticCache(config=model.config, max_cache_len=48)


def _plain(model, ids, n: int):
    """Tokens and last logits of ``ids`` prefilled into a fresh static cache and ``n`` plain decode steps."""
    cache = _cache(model)
    return _decode(model.forward, _prefill(model.forward, ids, cache), cache, ids.shape[1], n)


@pytest.mark.parametrize("case", ["dynamic", "offload", "batched positions", "static"])
def test_capture_refuses_steps_whose_label_bookkeeping_is_on_the_host(case):
    """What a replay could not repeat is refused while a CUDA graph is recorded, naming it and the fix (on a GPU
    the site op calls this check only during capture)."""
    from dsc.config import Selection
    from dsc.passes.runtime import SiteSpec
    from dsc.passes.site_op import SiteCall, _check_graph_safe
    from dsc.passes.store import LabelSpec

    spec = SiteSpec(LabelSpec(torch.zeros(1, 1, dtype=torch.long), 16), 1, Selection(), offload=case == "offload")
    positions = torch.zeros(2, 1, dtype=torch.long) if case == "batched positions" else torch.zeros(1, dtype=torch.long)
    t = torch.zeros(2, 1, 1, 4)
    call = SiteCall(1, 0, t, t, t, None, t, positions, None, False, 0.5, "dynamic" if case == "dynamic" else "static")
    if case == "static":
        _check_graph_safe(spec, call)
        return
    with pytest.raises(RuntimeError, match=f"{case.split()[-1]}.*reduce-overhead"):
        _check_graph_safe(spec, call)
