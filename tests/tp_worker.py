"""Run by tests/test_tp.py under ``torchrun --nproc_per_node 2``: load a saved tiny model with HF tensor parallelism
(``tp_plan="auto"``, gloo on CPU), decode with the dsparse backend in three configurations, write each rank's tokens
and sparse-call counts as JSON. Not a test module (no ``test_`` prefix)."""
import json
import sys

import torch
import transformers as T

import dsc
from dsc.calibration.config import ChannelConfig

RUNS = {"full": dict(budget=256), "group": dict(budget=6, gqa="group"), "head": dict(budget=6, gqa="head")}


def main(model_dir: str, config_path: str, out_prefix: str) -> None:
    model = T.AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", attn_implementation="sdpa").eval()
    rank = torch.distributed.get_rank()
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    chans = ChannelConfig.load(config_path)  # calibrated unsharded: the backend takes this rank's KV heads
    result = {}
    for name, opts in RUNS.items():
        torch._dynamo.reset()
        backend = dsc.sparse_backend(channels=chans, inner="eager", dense_layers=(0,), r=8, sink=1, recent=2, **opts)
        model.forward = torch.compile(model.forward, backend=backend)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False)
        del model.forward
        result[name] = {"tokens": out.tolist(), "sparse_calls": backend.runtime.stats["sparse_calls"]}
    with open(f"{out_prefix}.{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
