"""Shared helpers of the kernel tests (plain functions and hypothesis strategies, no tests): the random ``cases``
strategy, the explicit format grid the deterministic ``ci`` profile always runs, tolerances, and a counter of the
ops' argument checks. Test modules import from here, never from each other."""
import itertools

import torch
from hypothesis import example, settings
from hypothesis import strategies as st

HEAD_DIMS = [16, 32, 64, 80, 96, 128, 256]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def scaled(n: int):
    """``settings(max_examples=...)``: ``n`` under the deterministic ``ci`` profile (20 examples), proportionally
    more under ``dev`` (HYPOTHESIS_PROFILE=dev, ``make test-dev``)."""
    return settings(max_examples=max(1, n * settings.default.max_examples // 20))


def format_grid(s: int, small: bool = False) -> list:
    """Explicit ``cases`` (the ci profile is derandomized, so these are what always runs): every label format
    (16 / 8 / 4 bits) x GQA group (1, 2, 4 or 8) x head_dim class (power of two 64, not a power of two 80, small 16),
    the other knobs (dtype, masks, lengths, Lq, selection mode, budget rule, sink / recent) rotating through their
    values. ``s`` (odd) sets the least cache length (never a power of two); ``small`` keeps batch, KV heads and Lq
    at their least (Triton's interpreter is slow)."""
    out = []
    for i, (bits, g, d) in enumerate(itertools.product((16, 8, 4), (1, 2, 4), (64, 80, 16))):
        g = 8 if g == 4 and i % 2 else g
        r = (d // 4, d // 2 - 1, 1, 5)[i % 4]
        p = dict(seed=1000 + i, b=1 if small else 1 + i % 2, hkv=1 if small and g > 2 else 1 + i % 2, g=g,
                 lq=1 if small and i % 3 else 1 + i % 2, s=s + 2 * i, d=d, r=r, bits=bits, dtype=DTYPES[i % 3],
                 valid=("none", "shared", "per_head")[i % 3], bias=i % 4 == 1, lengths=i % 2 == 0)
        sel = dict(budget=(s // 4, 3, s + 8)[i % 3], frac=(0.0, 0.0, 1 / 16, 0.3)[i % 4], sink=i % 3,
                   recent=(0, 1, 4)[i % 3], group=i % 2 == 1)
        out.append((p, sel))
    return out


def with_formats(s: int, small: bool = False):
    """Decorator: :func:`format_grid` as hypothesis ``@example``s of a test taking one ``cases()`` argument."""
    def deco(fn):
        for case in reversed(format_grid(s, small)):
            fn = example(case)(fn)
        return fn
    return deco


@st.composite
def cases(draw, max_s=2048, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    g = draw(st.sampled_from([1, 2, 3, 4, 8]))
    hkv = draw(st.integers(1, 2))
    b = draw(st.integers(1, 4 if g * hkv <= 4 else 2))
    d = draw(st.sampled_from(HEAD_DIMS))
    s = draw(st.integers(1, max_s).filter(lambda n: n & (n - 1) != 0 or n == 1))
    p = dict(seed=draw(st.integers(0, 2**31 - 1)), b=b, hkv=hkv, g=g, lq=draw(st.integers(1, 4)), s=s, d=d,
             r=draw(st.integers(1, d // 2)), bits=draw(st.sampled_from([16, 8, 4])),
             dtype=draw(st.sampled_from(dtypes)), valid=draw(st.sampled_from(["none", "shared", "per_head"])),
             bias=draw(st.booleans()), lengths=draw(st.booleans()))
    sel = dict(budget=draw(st.integers(1, s + 8)), frac=draw(st.sampled_from([0.0, 0.0, 1 / 16, 0.3])),
               sink=draw(st.integers(0, 3)), recent=draw(st.integers(0, 8)), group=draw(st.booleans()))
    return p, sel


def count_checks(monkeypatch) -> dict:
    """Count the calls of the argument checks a decode step could make (wrapped in place in ``checks``)."""
    from dsc.kernels import checks

    calls = {}
    for name in ("check_ds_decode", "check_label_scores", "check_select", "check_sparse_attention"):
        real = getattr(checks, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(checks, name, counted)
    return calls


# one check_ds_decode (which checks the label scores' arguments once), no per-step checks
ONCE = {"check_ds_decode": 1, "check_label_scores": 1}
