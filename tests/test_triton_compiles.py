"""Every Triton kernel compiles for the GPU the project targets (H100/H200, sm_90), on this CPU-only machine.

The interpreter runs the kernels' Python, not their lowering: a type or layout error in the real compiler would show
first on a GPU. Here each launcher is called with GPU launch geometry (block sizes, ``NATIVE_DOT`` for 16-bit
inputs) and its kernel launches are recorded instead of run; a process without the interpreter then compiles each
recorded signature ahead of time with Triton's NVIDIA backend down to a cubin (its ``ptxas`` ships in the wheel).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dsc.kernels import reference as R
from dsc.kernels import triton_ops, triton_paged
from dsc.kernels import triton_kernels as tk
from dsc.kernels.testing import make_case

SM90 = ("cuda", 90, 32)
COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dsc.kernels import triton_kernels, triton_paged

for call in json.load(open(sys.argv[1])):
    fn = getattr(triton_kernels if call["module"] == "tk" else triton_paged, call["name"])
    given = dict(zip([p.name for p in fn.params], call["args"]), **call["kwargs"])
    signature, constants = {}, {}
    for p in fn.params:
        kind, value = given[p.name]
        if p.is_constexpr:
            signature[p.name], constants[p.name] = "constexpr", value
        else:
            signature[p.name] = value if kind == "tensor" else {"int": "i64" if abs(value) >= 2**31 else "i32",
                                                                 "float": "fp32", "bool": "i1"}[kind]
    kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget(sys.argv[2], int(sys.argv[3]), 32))
    print(call["name"], signature[fn.params[0].name], len(kernel.asm["cubin"]))
"""
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
           torch.int32: "*i32", torch.uint8: "*u8", torch.int8: "*i8", torch.bool: "*i1"}


def _describe(value):
    if isinstance(value, torch.Tensor):
        return ["tensor", POINTER[value.dtype]]
    if isinstance(value, bool):
        return ["bool", value]
    return ["int" if isinstance(value, int) else "float", value]


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` records its arguments (JSON-described) and runs nothing."""

    def __init__(self, module: str, name: str, calls: list):
        self.module, self.name, self.calls = module, name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kwargs = {k: _describe(v) for k, v in kwargs.items()}
            if "NATIVE_DOT" in kwargs:  # tensor-core dots for 16-bit inputs, as on a GPU
                kwargs["NATIVE_DOT"] = ["bool", args[0].dtype in (torch.float16, torch.bfloat16)]
            self.calls.append({"module": self.module, "name": self.name, "args": [_describe(a) for a in args],
                               "kwargs": kwargs})
        return launch


def _launch_everything():
    """Every launcher once per input dtype class, with GPU geometry."""
    for dtype in (torch.float32, torch.bfloat16):
        for bits in (16, 8, 4):
            c = make_case(0, 2, 2, 4, 1, 320, 128, 16, bits, dtype, valid="shared", bias=True, lengths=True)
            for group in (True, False):
                triton_ops.ds_decode(c.q, c.k, c.v, *c.labels, c.valid, c.bias, c.lengths, 32, 1 / 16, 4, 16,
                                     group, None)
            triton_ops.label_write(c.k[:, :, :3], c.channels, torch.arange(3), c.data, c.scale, c.zero, bits)
            state = torch.zeros(2, 2, 2, dtype=torch.int64)
            triton_ops.label_sync(c.k, c.channels, torch.tensor([5]), c.data, c.scale, c.zero, bits, state)
        triton_ops.write_rows(c.k[:, :, :3], torch.arange(3), c.k.clone())
        kp = c.k.transpose(1, 2).reshape(-1, 16, 2, 128).contiguous()  # [pages, page size, Hkv, D]
        bt = torch.arange(kp.shape[0], dtype=torch.int32).view(2, -1)
        idx = R.select_topk(torch.randn(2, 2, 1, 320), 32)
        triton_paged.paged_sparse_attention(c.q, kp, kp, bt, torch.full((2,), 320, dtype=torch.int32), idx, 0.1)
    triton_ops.select_topk(torch.randn(2, 2, 1, 320), 32, 0.1, 4, 16)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches under the interpreter")
def test_every_triton_kernel_compiles_for_sm90(monkeypatch, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    calls: list = []
    for module, mod in (("tk", tk), ("tp", triton_paged)):
        for name in dir(mod):
            if name.endswith("_kernel"):
                monkeypatch.setattr(mod, name, _Recorder(module, name, calls))
    for mod in (triton_ops, triton_paged):
        monkeypatch.setattr(mod, "_interpreting", lambda: False)
    monkeypatch.setenv(triton_ops.FUSED_SELECT_ENV, "1")  # the opt-in select kernel too
    _launch_everything()
    names = {c["name"] for c in calls}
    assert names == {"label_write_kernel", "label_sync_kernel", "label_scores_kernel", "select_kernel",
                     "sparse_attn_split_kernel", "merge_kernel", "rows_write_kernel",
                     "paged_sparse_attn_split_kernel"}, names
    unique = list({json.dumps(c, sort_keys=True): c for c in calls}.values())
    (tmp_path / "calls.json").write_text(json.dumps(unique))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", COMPILE, str(tmp_path / "calls.json"), *map(str, SM90[:2])],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    compiled = r.stdout.splitlines()
    assert len(compiled) == len(unique) and all(int(line.split()[-1]) > 0 for line in compiled), r.stdout
