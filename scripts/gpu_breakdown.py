"""Where a Double Sparsity decode-attention step spends its time on a GPU: label scores, selection, sparse attention
(split + merge), against dense SDPA; medians from triton.testing.do_bench (CUDA events). The selection is timed
both ways: the opt-in fused radix-select kernel (``select_fused``, ``DSC_TRITON_SELECT=1``) and the default
torch path (``select``: ``torch.topk`` plus the sink/recent/validity passes), with the model's default rule (1/16,
floor 36, sink 4, recent 16) and with a plain budget: the numbers that decide the default; the group scores too: the two fused launches (``scores``) and what they
replaced (``scores_unfused``: per-head scores, then the torch reduction)."""
import torch
import torch.nn.functional as F
from triton.testing import do_bench

import dsc.kernels  # noqa: F401
from dsc.kernels import topk
from dsc.kernels.reference import group_scores
from dsc.kernels import triton_ops as T

for b, s in [(1, 131072), (8, 131072), (1, 1048576)]:
    hq, hkv, d, r, kk = 32, 8, 128, 32, s // 16
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, 1, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(b, hkv, s, d, device="cuda", generator=g).bfloat16()
    v = torch.randn_like(k)
    ch = torch.stack([torch.randperm(d, device="cuda", generator=g)[:r] for _ in range(hkv)])
    lab = k.gather(-1, ch[None, :, None, :].expand(b, hkv, s, r)).contiguous()
    e = torch.empty(0, device="cuda")
    labels = (ch, lab, e, e, 16)
    sc = T.label_scores(q, *labels, None, None, True)
    idx = T.select_topk(sc, kk)
    t = {"scores": do_bench(lambda: T.label_scores(q, *labels, None, None, True), return_mode="median"),
         "scores_unfused": do_bench(lambda: group_scores(T.label_scores(q, *labels, None, None, False).view(
             b, hkv, hq // hkv, 1, s)), return_mode="median"),
         "select": do_bench(lambda: topk.select_topk(sc, kk), return_mode="median"),
         "select_fused": do_bench(lambda: T.select(sc, kk, 0.0, 0, 0), return_mode="median"),
         "select_rule": do_bench(lambda: topk.select_topk(sc, 36, 1 / 16, 4, 16), return_mode="median"),
         "select_rule_fused": do_bench(lambda: T.select(sc, 36, 1 / 16, 4, 16), return_mode="median"),
         "torch.topk": do_bench(lambda: torch.topk(sc, kk, dim=-1, sorted=False), return_mode="median"),
         "sparse_attn": do_bench(lambda: T.sparse_attention(q, k, v, idx, d ** -0.5), return_mode="median"),
         "ds_decode": do_bench(lambda: T.ds_decode(q, k, v, *labels, budget=kk), return_mode="median"),
         "dense_sdpa": do_bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                                return_mode="median")}
    print(f"B={b} S={s} k={kk} 32x8x128 bf16 r={r} group:", "  ".join(f"{n} {ms * 1e3:.0f}us" for n, ms in t.items()))
