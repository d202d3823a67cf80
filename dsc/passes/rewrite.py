"""Apply the analysis: replace each sparse-capable SDPA node with ``dsc::site_attention``, and each other exact
GQA site with ``dsc::dense_attention`` (the same attention over the KV-native K/V).

Runs on the Dynamo graph, before AOTAutograd: the new op reads the KV-native cache value *after* its in-place
write (the same FX node the SDPA read), so functionalization keeps the cache update in place, and the dead
``repeat_kv`` copies are removed. Any other site (training, dropout, unrecognised shapes) is left as it was.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from dsc.config import DSConfig

from . import predict
from .runtime import Runtime, SiteSpec
from .site_op import SiteCall, default_scale
from .analysis import Site, _ev, _is_fn, analyze, cat_parts, find_cache_write

_VIEWISH = {"reshape", "view", "expand", "unsqueeze", "contiguous", "repeat_interleave", "transpose"}


def analyze_module(gm: GraphModule, cfg: DSConfig) -> list[Site]:
    chans = cfg.channels
    has_layer = chans.has_layer if chans is not None else (lambda layer: True)
    return analyze(gm.graph, has_layer=has_layer, dense_layers=cfg.dense_layers, r=cfg.r,
                   dense_prefill=cfg.prefill == "dense")


def _site_channels(site: Site, cfg: DSConfig):
    """The channel config for ``site``: the configured one, or, under tensor parallelism (the graph holds
    ``1/world`` of the config's heads), this rank's shard of it. Raises if the config is for another model: every
    size the graph shows must equal the config's (query heads, KV heads, head_dim)."""
    chans = cfg.channels
    hq, hkv = site.heads
    d = site.node.args[0].meta["example_value"].shape[-1]
    world, rank = _tensor_parallel()
    if world > 1 and (hq * world, hkv * world) == (chans.num_heads, chans.num_kv_heads):
        chans = chans.shard(rank, world)
    chans.check_shapes(num_heads=hq, num_kv_heads=hkv, head_dim=d if isinstance(d, int) else None,
                       what=f"the attention at {site.module_path}")
    return chans


def _tensor_parallel() -> tuple[int, int]:
    """``(world size, rank)`` of torch.distributed's default group, ``(1, 0)`` outside a distributed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _check_layers(sites: list[Site], cfg: DSConfig) -> None:
    """Raise if the graph has a decoder layer the channel config's model does not (any site, sparse or not)."""
    deepest = max((s for s in sites if s.layer is not None), key=lambda s: s.layer, default=None)
    if deepest is not None and deepest.layer >= cfg.channels.num_layers:
        cfg.channels.check_shapes(num_layers=deepest.layer + 1,
                                  what=f"this model (its attention at {deepest.module_path} is layer {deepest.layer})")


def _drop_dead(nodes: list) -> None:
    """Erase the now-unused view/copy chains (repeat_kv) the old SDPA read, and nothing else."""
    todo = [n for n in nodes if isinstance(n, Node)]
    while todo:
        n = todo.pop()
        if n.graph is None or n.users or n.op not in ("call_method", "call_function"):
            continue
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        if name not in _VIEWISH and name != "getitem":
            continue
        inputs = list(n.all_input_nodes)
        n.graph.erase_node(n)
        todo.extend(inputs)


def _replace(graph, old: Node, target, args: tuple) -> Node:
    """Put a call of ``target(*args)`` in place of ``old`` (same metadata) and erase ``old`` with the view/copy
    chains only it read (HF's repeat_kv)."""
    with graph.inserting_before(old):
        new = graph.call_function(target, args)
    new.meta.update({k: v for k, v in old.meta.items() if k in ("example_value", "val", "nn_module_stack",
                                                              "source_fn_stack", "stack_trace")})
    old_inputs = list(old.all_input_nodes)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    _drop_dead(old_inputs)
    return new


def _attend_kv_native(graph, site: Site) -> None:
    """A dense GQA site: ``dsc::dense_attention`` over the KV-native K/V instead of SDPA over K/V repeated to Hq
    heads (exact; the repeat_kv copy, G times the cache, is gone)."""
    site.node = _replace(graph, site.node, torch.ops.dsc.dense_attention.default,
                         (site.q, site.k, site.v, site.attn_mask, site.is_causal, site.scale))


def _placeholder_dynamic(graph, site: Site) -> str:
    """Offloaded dynamic cache: let the model's cache hold ``dsc::kv_placeholder`` tensors (the shape, one stored
    element) instead of ``cat(past, new)``, and hand the site op this step's rows; the rows live in the host store.
    Only where the site op and the graph's outputs (the cache update) are the cat's sole readers; else the device
    cache stays and the returned reason says why."""
    op = site.node
    kcat, vcat = site.k, site.v
    parts = [cat_parts(kcat), cat_parts(vcat)]
    if None in parts:
        return "kept on the device: V is not built by cat(past, new) like K"
    for node in (kcat, vcat):
        others = [u for u in node.users if u is not op and u.op != "output"]
        if others:
            return f"kept on the device: {node.name} is also read by {others[0].name}"
    (past_k, new_k), (past_v, new_v) = parts
    with graph.inserting_before(op):
        kph = graph.call_function(torch.ops.dsc.kv_placeholder.default, (past_k, new_k))
        vph = graph.call_function(torch.ops.dsc.kv_placeholder.default, (past_v, new_v))
    for cat, ph in ((kcat, kph), (vcat, vph)):
        ph.meta.update({k: v for k, v in cat.meta.items() if k in ("example_value", "val")})
        cat.replace_all_uses_with(ph)
        graph.erase_node(cat)
    call = SiteCall.of(op)
    call.new_v = new_v
    call.put(op)
    return "placeholders (rows in the host store only)"


def _placeholder_static(graph, site: Site) -> str:
    """Offloaded static cache: the writes ``buf.index_copy_(2, pos, new)`` of K and V are dropped (the site op
    writes the host store from ``new``) and a buffer this graph allocates itself (HF's lazy first-step ``zeros``)
    becomes ``dsc::kv_buffer_placeholder``, which later steps receive as their buffer input. A buffer allocated
    before the graph ran keeps its rows on the device (the returned reason says so)."""
    op = site.node
    order = {n: i for i, n in enumerate(graph.nodes)}
    call = SiteCall.of(op)
    writes = [find_cache_write(x, op, order) for x in (call.k, call.v)]
    if any(w is None or w["cache"] != "static" for w in writes):
        return "kept on the device: V is not written like K (index_copy_ into a buffer)"
    for w in writes:
        write, base = w["write"], w["write"].args[0]
        ev = _ev(base)
        placeholder_input = base.op == "placeholder" and ev is not None and ev.dim() == 4 and ev.stride(2) == 0
        if not (placeholder_input or _is_fn(base, torch.zeros)):
            return ("kept on the device: the static buffers existed before this graph ran (let the cache's first "
                    "forward run through the compiled model to keep only placeholders)")
        for u in list(base.users) + list(write.users):
            if u is not write and u is not op and u.op != "output" and not all(x is op for x in u.users):
                return f"kept on the device: {base.name} is also read by {u.name}"
    for w in writes:
        write, base = w["write"], w["write"].args[0]
        write.replace_all_uses_with(base)
        graph.erase_node(write)
        if base.op != "placeholder":  # torch.zeros(size, dtype=..., device=...) -> a one-element placeholder
            size = base.args[0] if base.args else base.kwargs["size"]
            with graph.inserting_after(base):
                ph = graph.call_function(torch.ops.dsc.kv_buffer_placeholder.default,
                                         (list(size), base.kwargs.get("dtype"), base.kwargs.get("device")))
            ph.meta.update({k: v for k, v in base.meta.items() if k in ("example_value", "val")})
            base.replace_all_uses_with(ph)
            graph.erase_node(base)
    call = SiteCall.of(op)  # re-read: the writes' uses were replaced
    call.new_v = writes[1]["new_k"]
    call.put(op)
    return "placeholders (rows in the host store only)"


def rewrite(gm: GraphModule, cfg: DSConfig, runtime: Runtime) -> list[Site]:
    """Rewrite ``gm`` in place, registering its sparse sites in ``runtime``; return every SDPA site with its
    decision."""
    cfg.require_channels()
    sites = analyze_module(gm, cfg)
    _check_layers(sites, cfg)
    graph = gm.graph
    for site in sites:
        if site.kv_native:
            _attend_kv_native(graph, site)
        if site.action != "sparse":
            continue
        chans = _site_channels(site, cfg)
        spec = SiteSpec(label=runtime.label_spec(chans, site.layer, cfg.r, cfg.label_bits), layer=site.layer,
                        selection=cfg.selection, dense_prefill=cfg.prefill == "dense", offload=cfg.offload)
        sid = runtime.add_site(spec)
        site.extra["site_id"] = sid
        old = site.node
        scale = site.scale
        if scale is None:
            scale = default_scale(int(old.args[0].meta["example_value"].shape[-1]))
        call = SiteCall(runtime.key, sid, site.q, site.k, site.v, site.past_k, site.new_k, site.positions,
                        site.attn_mask, site.is_causal, float(scale), site.cache)
        new = site.node = _replace(graph, old, torch.ops.dsc.site_attention.default, call.args())
        if spec.offload:
            place = _placeholder_dynamic if site.cache == "dynamic" else _placeholder_static
            site.extra["device_cache"] = place(graph, site)
            call = SiteCall.of(new)
            site.k, site.v = call.k, call.v  # the cats / buffers may have been replaced
    if cfg.offload and cfg.predict:
        predict.insert(graph, sites, set(cfg.sync_layers), runtime.key)
    if cfg.offload and sites and not any(s.action == "sparse" for s in sites):
        reasons = "; ".join(sorted({f"{s.module_path or 'site ' + str(s.index)}: {s.reason}" for s in sites}))
        raise ValueError(f"dsparse offload=True, but no attention site of this graph can be made sparse, so nothing "
                         f"would be offloaded ({reasons}). Drop offload, or fix what keeps the sites dense "
                         f"(see dsc.explain(model, ...)).")
    graph.lint()
    gm.recompile()
    return sites
