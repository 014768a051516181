from pathlib import Path

import pytest
import torch

# The models in tests are tiny: one thread is faster than two, and it does not oversubscribe the 2-core
# machine when a test starts subprocesses (torchrun, sandboxes). Benchmarks choose their own thread counts.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def bwrap() -> str:
    """bubblewrap for the code sandbox. Missing, the test fails with the install hint, unless `make test` could not
    install it and set NANOSEEK_SKIP_SANDBOX_TESTS=1: then the test is skipped with that reason."""
    import os

    from nanoseek.rewards.sandbox import SandboxUnavailable, require_bwrap

    try:
        return require_bwrap()
    except SandboxUnavailable as err:
        if os.environ.get("NANOSEEK_SKIP_SANDBOX_TESTS") == "1":
            pytest.skip(f"code sandbox unavailable (NANOSEEK_SKIP_SANDBOX_TESTS=1): {err}")
        raise


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    """A tiny SFT run directory (2 steps on arithmetic) that RL tests start from."""
    from nanoseek import cli

    out = tmp_path_factory.mktemp("sft") / "run"
    assert cli.main(["sft", "--preset", "tiny", "--task", "arithmetic", "--steps", "2", "--batch-size", "4",
                     "--seq-len", "32", "--no-progress", "--out", str(out)]) == 0
    return out
