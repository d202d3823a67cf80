"""A CPU stand-in for CUDA graph capture and replay, to check that a decode step is replayable without a GPU.

A CUDA graph keeps the kernels a step launched, with their arguments (addresses, scalars) fixed, and drops all
host code: a replay runs the same kernels on whatever the same memory holds. :class:`Recording` does that at the
dispatcher's level: while a step runs it records every op call with its tensors (their storage is the
"address"); :meth:`Recording.replay` runs the recorded calls again, writing each result into the tensor the
recording produced (so later calls read it, as later kernels read the same memory). ``dsc::site_attention`` is a
single op but holds host code (label bookkeeping, strategy choice) a graph would not keep, so the recording runs
its body and records the ops it calls instead. A host read of a tensor value during the recording (``item``,
``equal``, ``nonzero``, ...), which a capture would refuse or freeze, fails at once.

Dynamo does not run compiled code under a dispatch mode, so the mode is entered inside the compiled graph, as
inductor's CUDA graph trees wrap the compiled graph: :func:`record_inside_graphs` patches the dsparse backend's
inner compile so that each graph call made while a :class:`Recording` is :meth:`armed <Recording.arm>` runs under
it. The step must be one graph (host code between graphs would not be replayed): the recording counts them.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsc.backend
from dsc.passes import site_op

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default, aten.nonzero.default,
              aten.allclose.default}


def _aliases(func) -> bool:
    """Whether the op's first output aliases an input (a view, or an in-place op returning ``self``)."""
    rets = func._schema.returns
    return bool(rets) and rets[0].alias_info is not None


class Recording(TorchDispatchMode):
    """Record the op calls of the code run under it; :meth:`replay` them."""

    def __init__(self):
        super().__init__()
        self.calls: list = []
        self.graphs = 0  # compiled graphs run under it

    def arm(self):
        """Context: record the compiled graphs called inside it."""
        return _Armed(self)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is torch.ops.dsc.site_attention:
            with self:  # the body's host code runs once, now; the ops it calls are recorded
                return site_op.site_attention_body(*args, **kwargs)
        if func in HOST_READS:
            raise AssertionError(f"host read of a tensor value during a recorded step: {func}")
        out = func(*args, **kwargs)
        if not (out is None or isinstance(out, torch.Tensor)
                or (isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out))):
            raise AssertionError(f"{func} returned {type(out).__name__} to the host during a recorded step")
        self.calls.append((func, args, kwargs, out))
        return out

    def names(self) -> list[str]:
        return [str(func) for func, *_ in self.calls]

    def replay(self) -> None:
        for func, args, kwargs, out in self.calls:
            if _aliases(func) and not func._schema.is_mutable:
                continue  # a view: same memory as when recorded
            result = func(*args, **kwargs)
            if out is None or _aliases(func):
                continue  # mutated in place
            for dst, src in zip(*((out, result) if isinstance(out, (tuple, list)) else ((out,), (result,)))):
                dst.copy_(src)


_ARMED: list[Recording] = []


class _Armed:
    def __init__(self, recording: Recording):
        self.recording = recording

    def __enter__(self):
        _ARMED.append(self.recording)
        return self.recording

    def __exit__(self, *exc):
        _ARMED.remove(self.recording)


def record_inside_graphs(monkeypatch) -> None:
    """Make every graph the dsparse backend compiles run under the armed :class:`Recording`, if any."""
    inner = dsc.backend._inner

    def recording_inner(cfg, gm, example_inputs, mode):
        compiled = inner(cfg, gm, example_inputs, mode)

        def run(*args):
            if not _ARMED:
                return compiled(*args)
            rec = _ARMED[-1]
            rec.graphs += 1
            with rec:
                return compiled(*args)
        return run

    monkeypatch.setattr(dsc.backend, "_inner", recording_inner)
