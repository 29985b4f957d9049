import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def pytest_report_header(config):
    """The versions this run tested, so a CI log says which set passed or failed."""
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "transformers", "accelerate", "safetensors", "datasets", "tokenizers", "gguf", "lm_eval")
    found = []
    for name in names:
        try:
            found.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return "versions: " + " ".join(found)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and on a busy shared CPU a second thread
    that is not scheduled stalls every op for milliseconds. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
