"""Test-session set-up. Environment first: Triton's interpreter must be on before any @triton.jit runs,
inductor's cache must sit in a fixed folder outside the checkout so compiles are reused across runs, and parallel
workers get their share of the cores."""
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
_cache = Path(os.environ.get("DSC_CACHE") or Path.home() / ".cache" / "dsc")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_cache / "inductor"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist workers (make test runs one per core) share the cores: one worker's torch must not spin a thread
# on every core (read by torch when it is first imported, below this point)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=20, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (fp32, eval mode) and its tokenizer, loaded once per test run."""
    import torch

    from dsc.assets import load_model

    torch.manual_seed(0)
    return load_model()


@pytest.fixture(scope="session")
def model(smollm):
    return smollm[0]


@pytest.fixture(scope="session")
def tokenizer(smollm):
    return smollm[1]


@pytest.fixture
def clean_dynamo():
    """HF forwards share one decorated code object, so Dynamo's per-code recompile limit is shared by every model
    in the process: start the test from a clean Dynamo state with room to spare, and leave one behind."""
    import torch

    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch._dynamo.reset()
