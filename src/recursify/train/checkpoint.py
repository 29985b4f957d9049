"""Training checkpoints: ``out/checkpoints/step-XXXXXXX`` folders that are complete or absent.

A folder holds ``model.safetensors`` (the student, tied tensors stored once), ``optimizer.pt``,
``scheduler.pt``, one ``rng-rank{r}.pt`` per process, ``meta.json`` (step, tokens, world size,
FSDP) and ``manifest.json`` (size and hash of every other file). It is written through
`hub.atomic_dir` with every file fsync'd before the one rename, and read back only after its
manifest checks out, so a run killed at any moment resumes from the newest intact step.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..hub import atomic_dir
from .config import TrainError, warn

CHECKPOINT_PREFIX = "step-"
STUDENT_PREFIX = "student."  # the trainer wraps the student as `Distiller.student`


def _hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def student_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wrapped model's state dict under the student's own names, as its checkpoints expect."""
    return {k.removeprefix(STUDENT_PREFIX): v for k, v in state.items()}


def _save_model_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses shared storage (tied embeddings): store each tensor once, aliases in metadata."""
    from safetensors.torch import save_file

    tensors, aliases, seen = {}, {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def _load_model_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for k, src in aliases.items():
        state[k] = state[src]
    return state


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Committed checkpoint folders, oldest first (temp folders of interrupted saves are ignored)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def verify_checkpoint(path: Path) -> str | None:
    """None if every file of the manifest is there with its size and hash; else what is wrong."""
    manifest = path / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, expected {want['size']}"
        if _hash_file(f) != want["blake2b"]:
            return f"{name} does not match its hash"
    return None


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """Newest intact checkpoint; a damaged newer one is reported with a warning and skipped."""
    for path in reversed(list_checkpoints(out)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"checkpoint {path} is corrupted ({problem}); falling back to the previous one")
    return None


def _write_manifest(folder: Path) -> None:
    """fsync every file, then record its size and hash: what `verify_checkpoint` checks."""
    files = {}
    for f in sorted(folder.iterdir()):
        _fsync(f)
        files[f.name] = {"size": f.stat().st_size, "blake2b": _hash_file(f)}
    (folder / "manifest.json").write_text(json.dumps({"files": files}, indent=1))
    _fsync(folder / "manifest.json")
    _fsync(folder)


def save_checkpoint(out: Path, step: int, tokens: int, accelerator, model, optimizer, scheduler, keep_last: int,
                    is_fsdp: bool) -> Path:
    """Write out/checkpoints/step-XXXXXXX; every process takes part, the main process writes.

    The model goes to safetensors (the full state dict, gathered under FSDP); the optimizer is one
    file too, gathered under FSDP and keyed by parameter name (so resume may use another number of
    processes; pickling the per-rank DTensor shards ties them to the process group). RNG states are
    gathered from every rank and stored one file per rank.
    """
    root = out / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    state = accelerator.get_state_dict(model)  # collective under FSDP
    if is_fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opt_state = get_optimizer_state_dict(  # collective; the full state lands on rank 0 only
            model, optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        opt_state = optimizer.state_dict()
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rng_states = gather_object([_rng_state()])  # collective; rank order
    else:
        rng_states = [_rng_state()]
    if accelerator.is_main_process:
        for stale in root.glob(f".{CHECKPOINT_PREFIX}*.tmp-*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(final) as tmp:
            torch.save(opt_state, tmp / "optimizer.pt")
            for rank, rng in enumerate(rng_states):
                torch.save(rng, tmp / f"rng-rank{rank}.pt")
            _save_model_state(student_state(state), tmp / "model.safetensors")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            meta = {"step": step, "tokens": tokens, "world_size": accelerator.num_processes, "fsdp": is_fsdp}
            (tmp / "meta.json").write_text(json.dumps(meta))
            _write_manifest(tmp)
        _fsync(root)
        for old in list_checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = set(tied) if isinstance(tied, (dict, list, set, tuple)) else set()
    return keys if getattr(model.config, "tie_word_embeddings", False) else set()


def restore_model(ckpt: Path, student, is_fsdp: bool) -> int:
    """Load a checkpoint's weights into the (not yet wrapped) student; returns its step."""
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta.get("fsdp", False) != is_fsdp:  # the optimizer file is keyed differently
        how = "with" if meta.get("fsdp") else "without"
        raise TrainError(f"checkpoint {ckpt} was written {how} FSDP; resume it {how} FSDP too")
    missing, unexpected = student.load_state_dict(_load_model_state(ckpt / "model.safetensors"), strict=False)
    if unexpected or [k for k in missing if k not in _tied_keys(student)]:
        raise TrainError(f"checkpoint {ckpt} does not fit the student (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    return meta["step"]


def restore_training_state(ckpt: Path, accelerator, model, optimizer, scheduler, is_fsdp: bool) -> None:
    """Optimizer (each FSDP rank keeps its shard), LR schedule and this rank's RNG, after prepare."""
    opt_state = torch.load(ckpt / "optimizer.pt", map_location="cpu" if is_fsdp else accelerator.device,
                           weights_only=True)
    if is_fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer.optimizer, opt_state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng_file = ckpt / f"rng-rank{accelerator.process_index}.pt"
    _set_rng_state(torch.load(rng_file if rng_file.exists() else ckpt / "rng-rank0.pt", weights_only=True))
