import sys
from pathlib import Path

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
