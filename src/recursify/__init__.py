"""recursify: turn a pretrained decoder-only LLM into a smaller (Relaxed) Recursive Transformer."""

from .config import ConfigError, Layout, RecursionConfig, RecursiveConfig
from .conversion.convert import convert
from .families import UnsupportedModelError, supported_model_types
from . import families, hub
from .hub import ModelLoadError, load_pretrained
from .modeling import RecursiveForCausalLM  # importing it registers the architecture with the Auto classes

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Layout",
    "ModelLoadError",
    "RecursionConfig",
    "RecursiveConfig",
    "RecursiveForCausalLM",
    "UnsupportedModelError",
    "convert",
    "load_pretrained",
    "supported_model_types",
]
