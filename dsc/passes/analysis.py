"""Find the SDPA sites of a Dynamo FX graph and decide, per site, whether Double Sparsity can replace it.

Reads each ``scaled_dot_product_attention`` node's arguments, sees through HF's ``repeat_kv`` (unsqueeze/expand +
reshape, or ``repeat_interleave``) to the KV-native K/V, names the layer from ``nn_module_stack``, and finds the
cache write feeding K: ``index_copy_`` into a fixed buffer (static caches) or ``torch.cat(past, new)`` along
positions (dynamic caches). Anything else stays dense, with the reason recorded for :func:`dsc.explain`.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.fx import Graph, Node

from dsc.sites import is_sdpa, layer_index, sdpa_arguments

_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class Site:
    """One SDPA node and what the backend makes of it."""

    index: int
    node: Node
    module_path: Optional[str] = None
    layer: Optional[int] = None
    action: str = "dense"  # "sparse" or "dense"
    reason: str = ""
    cache: Optional[str] = None  # "static" | "dynamic"
    lq: Any = None
    s: Any = None
    heads: tuple = ()  # (Hq, Hkv as read)
    mask: str = "none"
    # rewrite inputs: q/k/v (KV-native)/attn_mask/is_causal/scale for every exact, recognised site (dense ones
    # become dsc::dense_attention), the cache nodes for sparse sites only
    q: Optional[Node] = None
    k: Optional[Node] = None
    v: Optional[Node] = None
    past_k: Optional[Node] = None
    new_k: Optional[Node] = None
    positions: Optional[Node] = None
    attn_mask: Optional[Node] = None
    is_causal: bool = False
    scale: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def kv_native(self) -> bool:
        """A dense site the rewrite points at the KV-native K/V (GQA without HF's repeat_kv copy)."""
        return self.action != "sparse" and self.extra.get("gqa_exact", False)

    @property
    def becomes(self) -> str:
        if self.action != "sparse":
            return "dsc.dense_attention (KV-native)" if self.kv_native else "SDPA (unchanged)"
        if self.lq == 1:
            return "dsc.site_attention: sparse decode"
        if isinstance(self.lq, int):
            return "dsc.site_attention: labels + " + ("dense prefill" if self.extra.get("dense_prefill")
                                                      else "sparse prefill")
        return "dsc.site_attention: sparse decode if Lq == 1, else " + (
            "dense prefill" if self.extra.get("dense_prefill") else "sparse")


def sdpa_args(node: Node) -> dict:
    """The SDPA call's arguments by name, defaults filled."""
    return {**_SDPA_DEFAULTS, **sdpa_arguments(node.args, node.kwargs)}


def _ev(n: Any):
    return n.meta.get("example_value", n.meta.get("val")) if isinstance(n, Node) else None


def _is_method(n: Any, *names: str) -> bool:
    return isinstance(n, Node) and n.op == "call_method" and n.target in names


def _is_fn(n: Any, *fns) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in fns


def _same(a: Any, b: Any) -> bool:
    """Statically the same size (ints, or the same symbol), without adding guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _compatible(a: Any, b: Any) -> bool:
    """Could be the same size: equal ints, or at least one symbolic (the kernels check at run time)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return True


def _full(s: Any) -> bool:
    return isinstance(s, slice) and s.start in (None, 0) and s.stop is None and s.step in (None, 1)


def see_through_repeat_kv(n: Node) -> tuple[Node, int]:
    """``(KV-native node, G)`` for ``reshape(expand(x[:, :, None]))`` / ``repeat_interleave(x, G, dim=1)``."""
    ev = _ev(n)
    if ev is None or ev.dim() != 4:
        return n, 1
    if _is_method(n, "reshape", "view") or _is_fn(n, torch.reshape):
        e = n.args[0]
        if _is_method(e, "expand") or _is_fn(e, torch.Tensor.expand):
            u = e.args[0]
            x = None
            if _is_fn(u, operator.getitem) and isinstance(u.args[1], tuple):
                idx = u.args[1]
                if len(idx) >= 3 and _full(idx[0]) and _full(idx[1]) and idx[2] is None and all(
                        _full(i) or i is Ellipsis for i in idx[3:]):
                    x = u.args[0]
            elif (_is_method(u, "unsqueeze") or _is_fn(u, torch.unsqueeze)) and u.args[1:] == (2,):
                x = u.args[0]
            xe = _ev(x)
            if xe is not None and xe.dim() == 4 and _same(xe.shape[0], ev.shape[0]) and _same(
                    xe.shape[2], ev.shape[2]) and _same(xe.shape[3], ev.shape[3]):
                hkv, hq = xe.shape[1], ev.shape[1]
                if isinstance(hkv, int) and isinstance(hq, int) and hkv and hq % hkv == 0:
                    return x, hq // hkv
    if _is_method(n, "repeat_interleave") or _is_fn(n, torch.repeat_interleave):
        args = dict(zip(("input", "repeats", "dim"), n.args))
        args.update(n.kwargs)
        x = args.get("input")
        xe = _ev(x)
        if args.get("dim") in (1, -3) and isinstance(args.get("repeats"), int) and xe is not None and xe.dim() == 4:
            return x, args["repeats"]
    return n, 1


def _prefix_base(n: Node) -> Node:
    """The buffer ``n`` is a prefix view of along positions (``buf[:, :, :m]``), else ``n``."""
    while _is_fn(n, operator.getitem) and isinstance(n.args[1], tuple):
        idx = n.args[1]
        if not (len(idx) in (3, 4) and _full(idx[0]) and _full(idx[1]) and isinstance(idx[2], slice)
                and idx[2].start in (None, 0) and idx[2].step in (None, 1) and all(_full(i) for i in idx[3:])):
            break
        n = n.args[0]
    return n


def cat_parts(node: Node) -> Optional[tuple]:
    """``(past, new)`` of a dynamic cache step ``cat([past, new], dim=-2)`` (``past`` None when it is the empty
    1-D tensor of a first step), else None."""
    if not _is_fn(node, torch.cat, torch.concat, torch.concatenate):
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim in (2, -2) and isinstance(tensors, (list, tuple)) and len(tensors) == 2:
        past, new = tensors
        pe, ne = _ev(past), _ev(new)
        if ne is not None and ne.dim() == 4 and pe is not None:
            if pe.dim() == 4:
                return past, new
            if pe.dim() == 1 and isinstance(pe.shape[0], int) and pe.shape[0] == 0:
                return None, new
    return None


def find_cache_write(k: Node, sdpa: Node, order: dict) -> Optional[dict]:
    """How the cache K reaching ``sdpa`` was written: ``{"cache": "dynamic", past_k, new_k}`` for
    ``cat([past, new], dim=-2)``, ``{"cache": "static", new_k, positions}`` for ``buf.index_copy_(2, pos, new)``
    (``k`` may be a prefix view of ``buf``), else None."""
    if _is_fn(k, torch.cat, torch.concat, torch.concatenate):
        parts = cat_parts(k)
        return None if parts is None else {"cache": "dynamic", "past_k": parts[0], "new_k": parts[1]}
    base = _prefix_base(k)
    writes = [u for u in base.users
              if (_is_method(u, "index_copy_") or _is_fn(u, torch.Tensor.index_copy_))
              and u.args[0] is base and len(u.args) >= 4 and u.args[1] in (2, -2) and order[u] < order[sdpa]]
    if writes:
        w = max(writes, key=order.__getitem__)
        pe, ne = _ev(w.args[2]), _ev(w.args[3])
        if ne is not None and ne.dim() == 4 and pe is not None and pe.dim() in (1, 2):
            return {"cache": "static", "new_k": w.args[3], "positions": w.args[2], "write": w}
    return None


_CACHE_LAYER = re.compile(r"\.layers\[(\d+)\]\.(?:keys|values)\b")


def cache_layer(*nodes: Any) -> Optional[int]:
    """The layer index of the HF cache layer a K node reads (``past_key_values.layers[i].keys``, seen in the
    Dynamo source of the graph input it is, or is a view of), else None. HF files each attention's cache under its
    ``layer_idx``, so this names the layer whatever wraps the module: accelerate hooks, regional compilation, or
    a model nested in another."""
    for n in nodes:
        n = _prefix_base(n) if isinstance(n, Node) else n
        m = _CACHE_LAYER.search(source_name(n) or "")
        if m:
            return int(m.group(1))
    return None


def _module_path(node: Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        if layer_index(path) is not None:
            return path
    if stack:
        return list(stack.values())[-1][0]
    return None


def _is_weight(n: Node) -> bool:
    """A graph input that is a parameter or buffer of the model (Dynamo lifts them to placeholders)."""
    ga = n.meta.get("grapharg")
    src = getattr(getattr(ga, "source", None), "name", "")
    src = src() if callable(src) else src
    return isinstance(_ev(n), torch.nn.Parameter) or "._parameters[" in str(src) or "._buffers[" in str(src)


def _data_inputs(n: Node) -> set:
    """The graph inputs ``n``'s value depends on, the model's weights aside."""
    seen, todo, found = set(), [n], set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.op == "placeholder":
            if not _is_weight(x):
                found.add(x)
        else:
            todo.extend(x.all_input_nodes)
    return found


def _keys_of_this_step(q: Node, new_k: Node) -> bool:
    """Self-attention: the keys written this step are this step's tokens, the query's own: as many as the query
    rows, and computed from a common input. Cross-attention keys come from encoder states (their own length), even
    when ``cat(empty, new)`` makes them look like a growing cache."""
    qe, ke = _ev(q), _ev(new_k)
    if qe is None or ke is None or not _same(qe.shape[2], ke.shape[2]):
        return False
    return bool(_data_inputs(q) & _data_inputs(new_k))


def _mask_ok(mask_ev, b, hq, lq, s) -> bool:
    if mask_ev.dim() > 4:
        return False
    shape = (1,) * (4 - mask_ev.dim()) + tuple(mask_ev.shape)
    return all((isinstance(m, int) and m == 1) or _compatible(m, t) for m, t in zip(shape, (b, hq, lq, s)))


def analyze(graph: Graph, *, has_layer: Callable[[int], bool], dense_layers=(), r: int = 16,
            dense_prefill: bool = True) -> list[Site]:
    """Every SDPA site of ``graph`` with its decision. Pure: the graph is not changed."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites = []
    for node in graph.nodes:
        if not (node.op == "call_function" and is_sdpa(node.target)):
            continue
        site = Site(index=len(sites), node=node, module_path=_module_path(node))
        site.layer = layer_index(site.module_path) if site.module_path else None
        site.extra["dense_prefill"] = dense_prefill
        sites.append(site)
        site.reason = _decide(site, sdpa_args(node), order, has_layer, set(dense_layers), r)
    return sites


def _decide(site: Site, a: dict, order: dict, has_layer, dense_layers: set, r: int) -> str:
    """Fill ``site`` and return why it is sparse or dense (``site.action`` is set to "sparse" on success).
    Structure first (what the site is), policy last (what the config wants), so the reason is the deepest one."""
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    qe, ke, ve = _ev(q), _ev(k), _ev(v)
    if qe is None or ke is None or ve is None:
        return "no shape information on the SDPA inputs"
    if qe.dim() != 4 or ke.dim() != 4 or ve.dim() != 4:
        return f"inputs are not 4-D [B, H, L, D] (q {qe.dim()}-D, k {ke.dim()}-D)"
    b, hq, lq, d = qe.shape
    site.lq = lq
    kn, g = see_through_repeat_kv(k)
    vn, gv = see_through_repeat_kv(v)
    if g != gv:
        kn, vn, g = k, v, 1
    kne, vne = _ev(kn), _ev(vn)
    hkv, s = kne.shape[1], kne.shape[2]
    site.s, site.heads = s, (hq, hkv)
    if mask is not None:
        me = _ev(mask)
        site.mask = "?" if me is None else "bool" if me.dtype == torch.bool else (
            "additive" if me.dtype.is_floating_point else str(me.dtype))
    elif a["is_causal"] is True:
        site.mask = "causal"
    w = find_cache_write(kn, site.node, order)
    site.cache = w["cache"] if w else None
    if w is not None:  # the cache layer HF files the keys under is the attention's own layer_idx
        found = cache_layer(w.get("past_k"), kn)
        site.layer = found if found is not None else site.layer
    if torch.is_grad_enabled() and qe.requires_grad:
        return "autograd: the inputs require grad (training); the sparse op has no backward"
    dropout = a["dropout_p"]
    if not isinstance(dropout, (int, float)):
        return "dropout_p is not a constant"
    if dropout > 0:
        return f"dropout_p={dropout} (training)"
    is_causal, scale = a["is_causal"], a["scale"]
    if not isinstance(is_causal, bool):
        return "is_causal is not a constant"
    if scale is not None and not isinstance(scale, (int, float)):
        return "scale is not a constant"
    # Positions may be distinct symbols for K and V under dynamic shapes (SDPA itself requires them equal).
    if not (_same(kne.shape[0], b) and _same(kne.shape[3], d) and _same(vne.shape[0], b)
            and _same(vne.shape[1], hkv) and _same(vne.shape[3], d)):
        return f"K/V shapes {tuple(kne.shape)} / {tuple(vne.shape)} do not match q {tuple(qe.shape)}"
    if not (isinstance(hkv, int) and isinstance(hq, int) and hkv and hq % hkv == 0):
        return f"query heads {hq} are not a multiple of KV heads {hkv}"
    if mask is not None:
        me = _ev(mask)
        if me is None:
            return "attn_mask is not a tensor"
        if me.dtype != torch.bool and not me.dtype.is_floating_point:
            return f"attn_mask dtype {me.dtype} is neither bool nor float"
        if not _mask_ok(me, b, hq, lq, s):
            return f"attn_mask shape {tuple(me.shape)} does not broadcast to [B, Hq, Lq, S] = {(b, hq, lq, s)}"
    # Exact and recognised: whatever is decided below, the rewrite can attend KV-native (no repeat_kv copy).
    site.q, site.k, site.v, site.attn_mask = q, kn, vn, mask
    site.is_causal = is_causal
    site.scale = float(scale) if scale is not None else None
    site.extra["gqa_exact"] = hq != hkv
    if (bounded := bounded_window(site, kn, mask, order)) is not None:
        return bounded
    if w is None:
        base = _prefix_base(kn)
        if base.op == "placeholder" and not any(u.op == "call_method" and str(u.target).endswith("_")
                                                for u in base.users):
            return ("K is a cache input this graph reads but never writes (cross-attention over encoder states, "
                    "or a cache filled elsewhere): nothing grows here to select from")
        if base.op == "placeholder":
            return ("K is read from a cache buffer updated in a way not recognised (only index_copy_ and "
                    "cat(past, new) are, not e.g. a sliding-window roll)")
        kind = "non-causal (encoder) attention" if not is_causal and mask is None else "attention"
        return f"{kind} with no KV-cache write feeding K: nothing to decode"
    if not _keys_of_this_step(q, w["new_k"]):
        return ("cross-attention: K does not depend on the decoder's own tokens (encoder states), so there is "
                "no growing cache to select from")
    if site.layer is None:
        return f"no decoder layer number in the module path {site.module_path!r}"
    if site.layer in dense_layers:
        return f"layer {site.layer} is a configured dense layer"
    if not has_layer(site.layer):
        return f"layer {site.layer} is not in the channel config"
    if isinstance(d, int) and r > d:
        return f"r={r} label channels exceed head_dim {d}"
    site.past_k, site.new_k, site.positions = w.get("past_k"), w["new_k"], w.get("positions")
    site.action = "sparse"
    seen = f", repeat_kv x{g} seen through" if g > 1 else ""
    return f"{site.cache} cache (layer {site.layer}, {site.mask} mask{seen})"


# ------------------------------------------------------------------------------ bounded (sliding-window) sites
# A sliding-window layer attends over at most W keys whatever the context, so it already reads a bounded slice of
# its cache, and HF's caches for it do not grow by ``cat``/``index_copy_`` alone (the dynamic one keeps only its
# last W - 1 rows, the static one rolls once full), so labels could not follow it step to step anyway. Such sites
# stay dense by policy, with their window in the reason; Double Sparsity goes to the global layers.
_SLIDING_ATTRS = ("cumulative_length_int",)  # HF's StaticSlidingWindowLayer counter (absent from full layers)
_MASK_VIEWS = {"to", "expand", "view", "reshape", "contiguous", "bool", "float", "unsqueeze"}


def _tail_rows(n: Any, base: Node) -> Optional[int]:
    """``m`` when ``n`` is ``base[:, :, -m:]`` (the last ``m`` positions, ``m`` a constant), else None."""
    if not (_is_fn(n, operator.getitem) and n.args[0] is base and isinstance(n.args[1], tuple)):
        return None
    idx = n.args[1]
    if not (len(idx) in (3, 4) and _full(idx[0]) and _full(idx[1]) and all(_full(i) for i in idx[3:])):
        return None
    s = idx[2]
    if (isinstance(s, slice) and isinstance(s.start, int) and s.start < 0 and s.stop is None
            and s.step in (None, 1)):
        return -s.start
    return None


def _stored(n: Node) -> Optional[str]:
    """How ``n`` is kept for the next step: "output" (a graph output: Dynamo's write-back of a cache attribute)
    or "copy" (the source of ``buf.copy_(n)``), else None."""
    for u in n.users:
        if u.op == "output":
            return "output"
        if (_is_method(u, "copy_") or _is_fn(u, torch.Tensor.copy_)) and len(u.args) > 1 and u.args[1] is n:
            return "copy"
    return None


def source_name(n: Any) -> Optional[str]:
    """The Dynamo source of a graph input (e.g. ``L['kwargs']['cache'].layers[1].keys``), else None."""
    if not (isinstance(n, Node) and n.op == "placeholder"):
        return None
    name = getattr(getattr(n.meta.get("grapharg"), "source", None), "name", None)
    if callable(name):
        name = name()
    return name if isinstance(name, str) else None


def _mask_source(mask: Any) -> Optional[str]:
    """The source name of the graph input ``mask`` is a view or cast of, else None."""
    for _ in range(8):
        if not isinstance(mask, Node):
            return None
        if mask.op == "placeholder":
            return source_name(mask)
        if _is_fn(mask, operator.getitem) or (mask.op == "call_method" and mask.target in _MASK_VIEWS):
            mask = mask.args[0]
        else:
            return None
    return None


def _short_source(src: str) -> str:
    """``L['kwargs']['attention_mask']['sliding_attention']`` -> ``attention_mask['sliding_attention']``."""
    if src.startswith("L[") and "]" in src:
        src = src[src.index("]") + 1:]
    if src.startswith("['") and "']" in src:
        j = src.index("']")
        src = src[2:j] + src[j + 2:]
    return src


def _rolled_into(buf: Node, sdpa: Node, order: dict) -> bool:
    """Whether ``buf`` is overwritten before ``sdpa`` by ``buf.copy_(x)`` with ``x`` a ``roll`` of ``buf`` along
    positions (a static sliding-window cache once full)."""
    for u in buf.users:
        if (_is_method(u, "copy_") or _is_fn(u, torch.Tensor.copy_)) and u.args[0] is buf and order[u] < order[sdpa]:
            src = u.args[1] if len(u.args) > 1 else None
            if _is_method(src, "roll") and src.args[0] is buf:
                dims = src.args[2] if len(src.args) > 2 else src.kwargs.get("dims")
                if dims in (2, -2, (2,), (-2,), [2], [-2]):
                    return True
    return False


def sliding_window(kn: Node, sdpa: Node, mask: Any, order: dict) -> Optional[tuple[Optional[int], str, str]]:
    """``(W, cache kind, evidence)`` when the KV-native K ``kn`` read by ``sdpa`` belongs to a sliding-window
    cache, else None. ``W`` is the window, the most keys one decode step attends (None where the graph does not
    show it: a static window not yet full only shows its buffer, ``min(W, max_cache_len)`` rows).

    Evidence, from the graph alone: the cache kept for the next step is the last rows of K (HF's dynamic
    sliding layer stores ``cat(past, new)[:, :, -(W-1):]``; a static one copies the last W rows into its buffer
    when a prefill overflows it); the buffer is rolled (a full static window); or, for a static window not yet
    full (an ordinary ``index_copy_``), HF's per-layer-type mask ``attention_mask['sliding_attention']`` or the
    sliding cache layer's own counter among the graph inputs."""
    for u in kn.users:
        rows = _tail_rows(u, kn)
        how = _stored(u) if rows is not None else None
        if how == "output":
            return rows + 1, "dynamic", f"the cache keeps only its last {rows} rows"
        if how == "copy":
            return rows, "static", f"the cache buffer keeps only the last {rows} rows"
    buf = _prefix_base(kn)
    ev = _ev(buf)
    rows = ev.shape[2] if ev is not None and ev.dim() == 4 and isinstance(ev.shape[2], int) else None
    if _rolled_into(buf, sdpa, order):
        return rows, "static", "the cache buffer rolls"
    if find_cache_write(kn, sdpa, order) is None or _is_fn(kn, torch.cat, torch.concat, torch.concatenate):
        return None
    held = f"; its cache holds {rows} rows" if rows is not None else ""
    src = _mask_source(mask)
    if src is not None and "sliding" in src:
        src = _short_source(src)
        return None, "static", f"its mask is {src}{held}"
    owner = source_name(buf)
    if owner is not None and owner.endswith(".keys"):
        prefix = owner[: -len("keys")]
        for n in buf.graph.nodes:
            if n.op != "placeholder":
                break
            name = source_name(n)
            if name is not None and name.startswith(prefix) and name[len(prefix):] in _SLIDING_ATTRS:
                return None, "static", f"its cache layer is HF's static sliding-window layer{held}"
    return None


def bounded_window(site: Site, kn: Node, mask: Any, order: dict) -> Optional[str]:
    """The dense reason of a sliding-window site (recorded in ``site.extra["window"]``), else None."""
    found = sliding_window(kn, site.node, mask, order)
    if found is None:
        return None
    window, cache, evidence = found
    site.cache = site.cache or cache
    site.extra["window"] = window
    size = f" of {window}" if window is not None else ""
    return f"sliding window{size}: already bounded ({evidence}); dense by policy"
