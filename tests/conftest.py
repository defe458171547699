import os

# The Triton interpreter is chosen when a kernel is decorated, so it must be set before triton is imported.
# The CPU test run sets it for the whole process; GPU runs (`make test-gpu`, `-m gpu`) leave it unset.
if not os.environ.get("FASTML_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from support import TARGETS  # noqa: E402

settings.register_profile("fastml", max_examples=20, deadline=None, derandomize=True)
settings.load_profile("fastml")


@pytest.fixture(scope="session", params=TARGETS)
def target(request):
    """Every backend this machine runs, with the device of its tensors: reference and cpp on CPU, triton on CPU
    under the interpreter, and with a CUDA device triton and cuda on it (marked `gpu`)."""
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run by `make test-gpu`)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
