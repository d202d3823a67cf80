"""Device memory held by the KV cache after ``generate`` on a GPU: the plain model vs the dsparse backend with
offload (dynamic cache), on a randomly initialised Llama with Llama-3-8B attention (32 query / 8 KV heads, head_dim
128), 8 layers, bf16. Measured with ``torch.cuda.memory_allocated`` while the cache is alive, weights subtracted;
the tokens of the offloaded run are compared with the backend's on-device run."""
import sys

import torch
import transformers as T

from dsc.backend import dsparse
from dsc.calibration.config import ChannelConfig
from dsc.generation import cache_bytes

context = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
layers, hq, hkv, d = 8, 32, 8, 128
cfg = T.LlamaConfig(vocab_size=1024, hidden_size=hq * d, intermediate_size=1024, num_hidden_layers=layers,
                    num_attention_heads=hq, num_key_value_heads=hkv, max_position_embeddings=context + 64)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
with torch.device("cuda"):
    model = T.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
channels = ChannelConfig.random(layers, hq, hkv, d, seed=1)
ids = torch.randint(3, 1024, (1, context), device="cuda")


def run(name, options=None):
    if options is not None:
        model.forward = torch.compile(model.forward, backend=dsparse, options=options)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cache = T.DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, past_key_values=cache,
                             disable_compile=True, pad_token_id=0)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    kv = cache_bytes(cache)
    print(f"{name:>22}: cache tensors on device {kv / 2**20:8.1f} MiB, allocated after generate "
          f"{held / 2**20:8.1f} MiB, peak during generate {peak / 2**20:8.1f} MiB", flush=True)
    if options is not None:
        del model.forward
    torch._dynamo.reset()
    return out, kv, held


opts = {"channels": channels, "budget": 1 / 16, "inner": "eager", "gqa": "group"}
dense, kv_dense, _ = run("plain model")
on_dev, kv_dev, _ = run("dsparse on device", opts)
off, kv_off, held_off = run("dsparse + offload", {**opts, "offload": True})
full = 2 * layers * context * hkv * d * 2
print(f"context {context}, full bf16 K/V of {layers} layers = {full / 2**20:.0f} MiB; offload keeps "
      f"{kv_off / kv_dense:.3f} of the plain model's cache tensors on the device (2 dense layers by default); "
      f"tokens offload == on-device dsparse: {off.tolist() == on_dev.tolist()}")
