import pytest
import torch

# The models in tests are tiny: one thread is faster than two, and it does not oversubscribe the 2-core
# machine when a test starts subprocesses (torchrun, sandboxes). Benchmarks choose their own thread counts.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
