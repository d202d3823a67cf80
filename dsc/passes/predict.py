"""Next-layer prediction for offload: select layer ``l+1``'s rows while layer ``l`` runs.

Consecutive layers' residual streams are close (ALGORITHM.md sec. 5), so layer ``l+1``'s query is predicted by
running layer ``l+1``'s own query path (its input norm, ``q_proj``, head reshape and RoPE) on the hidden state that
*enters layer l*. The pass finds that path in the Dynamo graph as the backward slice of the sparse site's query,
restricted to layer ``l+1``'s nodes; copies it with layer ``l+1``'s hidden-state input replaced by layer ``l``'s;
and feeds the predicted query to ``dsc::site_predict`` right after layer ``l``'s attention. That op selects from
layer ``l+1``'s labels (the current token excluded: its label is not written yet) and starts the fetch; layer
``l+1``'s ``dsc::site_attention`` takes the predicted selection as an input (which orders the two ops and keeps
the prediction alive), attends over the fetched rows plus the current token's rows from the device.

Anything the pass cannot find (no single hidden-state input, a query path that reads another layer's values, no
previous attention site) leaves the site selecting synchronously, with the reason in ``explain()``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Graph, Node

from dsc.sites import layer_index

from .analysis import Site, _ev, _is_fn, _is_method, _module_path, _prefix_base, sdpa_args


def _layer_of(n: Node) -> Optional[int]:
    path = _module_path(n)
    return layer_index(path) if path else None


def query_slice(site: Site) -> tuple[list[Node], Optional[Node], str]:
    """``(nodes, hidden, why)``: the nodes of the site's layer that compute its query, in graph order, and the one
    hidden-state node from outside the layer they read (``hidden`` None and ``why`` set when there is not one)."""
    layer = site.layer
    q = site.q if site.q is not None else sdpa_args(site.node)["query"]
    inside, outside = set(), set()
    todo = [q]
    while todo:
        n = todo.pop()
        if n in inside or n in outside:
            continue
        if n.op == "call_function" or n.op == "call_method":
            if _layer_of(n) == layer:
                inside.add(n)
                todo.extend(n.all_input_nodes)
                continue
        outside.add(n)
    hidden = []
    for n in outside:
        ev = _ev(n)
        if n.op == "placeholder" or ev is None or not isinstance(ev, torch.Tensor):
            continue
        if _layer_of(n) is not None and ev.dim() == 3 and ev.is_floating_point():
            hidden.append(n)
    if len(hidden) != 1:
        return [], None, (f"the query path of layer {layer} reads {len(hidden)} hidden states from other layers "
                          f"(prediction needs exactly one)")
    if any(n.op == "call_method" and n.target.endswith("_") for n in inside):
        return [], None, f"the query path of layer {layer} mutates a tensor in place"
    order = {n: i for i, n in enumerate(q.graph.nodes)}
    return sorted(inside, key=order.__getitem__), hidden[0], ""


def label_key(site: Site) -> Optional[Node]:
    """The graph value the site's label entry is filed under before the site runs: the static buffer (its write's
    target), or the dynamic cache's past K (None in a graph without one, e.g. a first prefill)."""
    if site.cache == "dynamic":
        return site.past_k
    n = site.k
    while True:
        base = _prefix_base(n)
        if _is_method(base, "index_copy_") or _is_fn(base, torch.Tensor.index_copy_):
            n = base.args[0]
            continue
        return base


def plan(graph: Graph, sites: list[Site], sync_layers) -> list[tuple]:
    """Decide, per sparse site, whether its selection can be predicted from the layer before; the reason goes to
    ``site.extra["predict"]`` (``explain()`` shows it). Returns ``(site, prev, query nodes, hidden, prev hidden,
    label key)`` for each predictable site. Pure: the graph is not changed."""
    by_layer = {s.layer: s for s in sites if s.layer is not None}
    order = {n: i for i, n in enumerate(graph.nodes)}
    out = []
    for site in sites:
        if site.action != "sparse":
            continue
        prev = by_layer.get(site.layer - 1) if site.layer is not None else None
        key = label_key(site)
        why = ""
        if site.layer in sync_layers:
            why = f"layer {site.layer} is in sync_layers"
        elif prev is None:
            why = f"no attention site in layer {site.layer - 1} to predict from"
        elif key is None:
            why = "no past K cache in this graph (a first prefill)"
        if why:
            site.extra["predict"] = "synchronous: " + why
            continue
        nodes, hidden, why = query_slice(site)
        prev_hidden = None
        if nodes:
            _, prev_hidden, why = query_slice(prev)
        if prev_hidden is not None:
            reads = {a for n in nodes for a in n.all_input_nodes if a not in nodes and a is not hidden}
            late = [a for a in reads | {key} | ({site.attn_mask} - {None}) if order[a] > order[prev.node]]
            if late:
                why = (f"the query path of layer {site.layer} reads {late[0].name}, computed after layer "
                       f"{prev.layer}'s attention")
        if why or prev_hidden is None:
            site.extra["predict"] = "synchronous: " + why
            continue
        site.extra["predict"] = f"predicted during layer {prev.layer} from its input hidden state"
        out.append((site, prev, nodes, hidden, prev_hidden, key))
    return out


def insert(graph: Graph, sites: list[Site], sync_layers, runtime: int) -> None:
    """Wire the prediction into every site :func:`plan` finds predictable (the sites are rewritten already);
    ``runtime``: the key of the runtime their site table lives in."""
    from .site_op import SiteCall

    for site, prev, nodes, hidden, prev_hidden, key in plan(graph, sites, sync_layers):
        env = {hidden: prev_hidden}
        last = prev.node  # after layer l's attention: everything the copy reads exists there
        for n in nodes:
            with graph.inserting_after(last):
                new = graph.node_copy(n, lambda x: env.get(x, x))
            new.meta = {k: v for k, v in n.meta.items() if k in ("example_value", "val", "nn_module_stack")}
            env[n] = new
            last = new
        with graph.inserting_after(last):
            ticket = graph.call_function(torch.ops.dsc.site_predict.default,
                                         (runtime, site.extra["site_id"], env[site.q], key, site.attn_mask,
                                          site.cache))
        call = SiteCall.of(site.node)
        call.prefetched = ticket
        call.put(site.node)
