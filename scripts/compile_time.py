"""Cold compile time of the decode step: plain inductor vs the dsparse backend (inductor inner), each in a fresh
process with an empty inductor cache, on the embedded model (the issue's target: dsparse <= 1.2x inductor).

The compile happens at the first decode step; its cost is that step's time less the median of the steps after it.

    .venv/bin/python scripts/compile_time.py [--context 1024] [--batch 1]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, torch
from dsc.assets import load_model
from dsc.bench.decode import compiled_forward, prompt_ids
from dsc.calibration.default import default_config
from dsc.generation import greedy_decode
policy, context, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
model, tok = load_model(None)
options = {"channels": default_config(None, model=model, tokenizer=tok, progress=False)}
forward = compiled_forward(model, "inductor", policy, options)
ids = prompt_ids(tok, context, batch, 4, 0)
r = greedy_decode(model, ids, 5, forward=forward, cache="static")
steps = sorted(r.step_s[1:])
print(f"RESULT {r.step_s[0] - steps[len(steps) // 2]:.2f}")
"""


def compile_seconds(policy: str, context: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0")
        done = subprocess.run([sys.executable, "-c", CHILD, policy, str(context), str(batch)], env=env,
                              capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{policy} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return float(lines[-1].split()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=1, help="fresh processes per policy, alternating")
    args = p.parse_args()
    times: dict[str, list[float]] = {"dense": [], "dsparse": []}
    for _ in range(args.runs):
        for policy in times:
            times[policy].append(compile_seconds(policy, args.context, args.batch))
            print(f"{policy:8s} compile {times[policy][-1]:.1f} s", flush=True)
    dense, sparse = (statistics.median(t) for t in times.values())
    print(f"median: inductor {dense:.1f} s, dsparse (inductor inner) {sparse:.1f} s, ratio {sparse / dense:.2f}x")


if __name__ == "__main__":
    main()
