"""The benchmark's student: a saved recursive checkpoint, checked at start-up before any weights
are read, so a wrong `--student` costs one clear line instead of a minute of loading."""

from __future__ import annotations

from pathlib import Path


class StudentError(ValueError):
    """`--student` does not name a recursive checkpoint of the benchmarked model."""


def check_student(path: str, teacher_config=None):
    """The student's RecursiveConfig; raises StudentError (one line) when `path` is not a saved
    recursive checkpoint (the output of `recursify convert`, `compress` or `train`) with at least
    one loop boundary, or when its vocabulary is not the original model's."""
    from ..hub import ModelLoadError, load_config

    where = f"--student {path}"
    folder = Path(path)
    if not folder.is_dir():
        raise StudentError(f"{where}: not a directory; give the output folder of `recursify compress` or `recursify train`")
    if not (folder / "config.json").is_file():
        raise StudentError(f"{where}: no config.json, so not a recursive checkpoint (the output of `recursify compress` or `recursify train`)")
    try:
        config = load_config(str(folder))
    except ModelLoadError as e:
        raise StudentError(f"{where}: {str(e).strip().splitlines()[0]}") from None
    kind = getattr(config, "model_type", None)
    if kind != "recursify":
        raise StudentError(f"{where}: a {kind!r} model, not a recursive checkpoint (the output of `recursify compress` or `recursify train`)")
    loops = int(config.recursion.get("num_loops", 1))
    if loops < 2:
        raise StudentError(f"{where}: {loops} loop, so no loop boundary to exit at; serve it as the original model instead")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise StudentError(f"{where}: no weight files (*.safetensors) next to its config.json")
    if teacher_config is not None and getattr(teacher_config, "vocab_size", None) != config.vocab_size:
        raise StudentError(f"{where}: a {config.vocab_size}-token vocabulary, but the original model has "
                           f"{teacher_config.vocab_size}: not a student of --model")
    return config
