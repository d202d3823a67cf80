"""Shared helpers of the paged-attention tests (no tests): a random paged KV cache with its contiguous oracle K/V,
the hypothesis strategy of its parameters and the explicit examples (every shape class) the ci profile runs."""
import math
from dataclasses import dataclass

import torch
from hypothesis import example
from hypothesis import strategies as st

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Paged:
    q: torch.Tensor
    kp: torch.Tensor
    vp: torch.Tensor
    bt: torch.Tensor
    lengths: torch.Tensor
    idx: torch.Tensor
    kc: torch.Tensor  # contiguous oracle K [B, Hkv, S, D] (zeros past each length)
    vc: torch.Tensor

    @property
    def args(self):
        return self.q, self.kp, self.vp, self.bt, self.lengths, self.idx

    @property
    def live_idx(self):
        """``idx`` with positions at or past each request's length turned into unused slots (-1)."""
        return torch.where(self.idx < self.lengths.long()[:, None, None, None], self.idx, -1)


def make_paged(p: dict, garbage: str = "nan", pad: str = "minus1", all_tokens: bool = False) -> Paged:
    """A random paged cache from the parameters ``p`` (see :func:`params`).

    Pages come from one shuffled pool shared by every request; with ``share`` request 1's first page is request
    0's (prefix sharing). ``garbage`` fills rows no request holds ("nan" or "big" random values); ``pad`` fills
    block-table entries past a request's pages ("minus1" or "big", an out-of-range page id). ``all_tokens``:
    every row's slots are a permutation of the request's tokens, then extra slots (-1 or past the length).
    """
    gen = torch.Generator().manual_seed(p["seed"])
    dtype = DTYPES[p["dtype"]]
    page, hkv, g, d, lq = p["page"], p["hkv"], p["g"], p["d"], p["lq"]
    lengths = list(p["lengths"])
    b = len(lengths)
    need = [math.ceil(n / page) for n in lengths]
    max_pages = max(1, max(need) + p["extra_pages"])
    n_pages = sum(need) + 2
    perm = torch.randperm(n_pages, generator=gen).tolist()
    pad_value = -1 if pad == "minus1" else n_pages + 1000
    bt = torch.full((b, max_pages), pad_value, dtype=torch.int32 if p["bt32"] else torch.int64)
    nxt = 0
    for i in range(b):
        for j in range(need[i]):
            bt[i, j] = perm[nxt]
            nxt += 1
    if p["share"] and b >= 2 and need[0] >= 1 and need[1] >= 1:
        bt[1, 0] = bt[0, 0]
    kp = torch.randn(n_pages, page, hkv, d, generator=gen).to(dtype)
    vp = torch.randn(n_pages, page, hkv, d, generator=gen).to(dtype)
    s = max_pages * page
    kc = torch.zeros(b, hkv, s, d, dtype=dtype)
    vc = torch.zeros(b, hkv, s, d, dtype=dtype)
    live = torch.zeros(n_pages, page, dtype=torch.bool)
    for i in range(b):
        for pos in range(lengths[i]):
            pg, off = int(bt[i, pos // page]), pos % page
            kc[i, :, pos] = kp[pg, off]
            vc[i, :, pos] = vp[pg, off]
            live[pg, off] = True
    junk = torch.full((n_pages, page, hkv, d), float("nan")) if garbage == "nan" else \
        1e3 * torch.randn(n_pages, page, hkv, d, generator=torch.Generator().manual_seed(p["seed"] + 1))
    kp[~live] = junk[~live].to(dtype)
    vp[~live] = junk[~live].to(dtype)
    hsel = hkv * g if p["per_head"] else hkv
    kk = p["slots"]
    idx = torch.full((b, hsel, lq, kk), -1, dtype=torch.int64)
    for row in range(b * hsel * lq):
        i = row // (hsel * lq)
        if all_tokens:
            pick = torch.randperm(lengths[i], generator=gen)
            extra = torch.arange(lengths[i], s + 3)[torch.randperm(s + 3 - lengths[i], generator=gen)]
            pick = torch.cat([pick, extra[: max(0, kk - lengths[i]) // 2]])[:kk]
        else:
            pick = torch.randperm(s + 3, generator=gen)[:kk]  # positions past the length (and the table) too
            pick = torch.where(torch.rand(pick.shape, generator=gen) < 0.2, -1, pick)
        idx.view(-1, kk)[row, : pick.numel()] = pick
    q = torch.randn(b, hkv * g, lq, d, generator=gen).to(dtype)
    return Paged(q, kp, vp, bt, torch.tensor(lengths, dtype=torch.int32 if p["len32"] else torch.int64), idx,
                 kc, vc)


@st.composite
def params(draw, max_len=60):
    page = draw(st.sampled_from([1, 16, 6]))
    g = draw(st.sampled_from([1, 2, 4]))
    b = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(0, max_len), min_size=b, max_size=b))
    return dict(seed=draw(st.integers(0, 2**31 - 1)), page=page, hkv=draw(st.integers(1, 2)), g=g,
                d=draw(st.sampled_from([16, 64, 80])), lq=draw(st.integers(1, 3)), lengths=lengths,
                extra_pages=draw(st.integers(0, 2)), slots=draw(st.integers(1, max(lengths) + 8)),
                per_head=draw(st.booleans()), dtype=draw(st.sampled_from(list(DTYPES))), share=draw(st.booleans()),
                bt32=draw(st.booleans()), len32=draw(st.booleans()))


def example_params(seed, page, g, lq, dtype, per_head, lengths, slots, *, hkv=2, d=64, extra=1, share=False,
                   bt32=True, len32=False):
    return dict(seed=seed, page=page, hkv=hkv, g=g, d=d, lq=lq, lengths=lengths, extra_pages=extra, slots=slots,
                per_head=per_head, dtype=dtype, share=share, bt32=bt32, len32=len32)


# Every shape class at least once: page sizes 1 / 16 / 6, groups 1 / 2 / 4, Lq 1 and > 1, fp32 / fp16 / bf16,
# per-group and per-head selection, int32 and int64 tables/lengths, shared pages, empty and page-aligned requests,
# more slots than tokens and fewer, head_dim not a power of two.
EXAMPLES = [
    example_params(1, 1, 1, 1, "fp32", False, [5, 9], 12, hkv=1),
    example_params(2, 16, 2, 3, "fp16", True, [33, 16, 0], 20, share=True, bt32=False),
    example_params(3, 6, 4, 2, "bf16", False, [12, 25], 30, share=True, len32=True),
    example_params(4, 16, 4, 1, "bf16", True, [48], 50, d=80, extra=0),
    example_params(5, 6, 2, 1, "fp32", True, [7, 1, 18], 9, hkv=1, bt32=False, len32=True),
    example_params(6, 1, 4, 2, "fp16", False, [0, 13], 4, d=16, share=True),
    example_params(7, 16, 1, 3, "fp32", False, [60, 17], 68, d=80, extra=2),
]


def with_examples(fn):
    """Decorator: :data:`EXAMPLES` as hypothesis ``@example``s."""
    for e in reversed(EXAMPLES):
        fn = example(e)(fn)
    return fn
