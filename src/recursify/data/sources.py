"""Reading text sources: files, folders and saved datasets, as documents in a reproducible order.

A .txt/.md/.rst file is one document; a .jsonl line (its "text") or a dataset row is one
document. Blank documents are skipped. Which side of the held-out split a document falls on is
a function of its text alone (:func:`is_heldout`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED = "'.txt', '.md', '.rst', '.jsonl' files or a datasets save_to_disk folder"


class DataError(ValueError):
    """Bad data input; the message is one line meant for the user."""


@dataclass(frozen=True)
class Unit:
    """One thing read as a whole: a text file, a jsonl file or a saved HF dataset folder."""

    kind: str  # "text" | "jsonl" | "hf"
    path: Path


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def _unit_for_file(path: Path) -> Unit | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return Unit("text", path)
    if suffix in JSONL_SUFFIXES:
        return Unit("jsonl", path)
    return None


def _walk(folder: Path) -> Iterator[Unit]:
    """Sorted walk so the document order (and so the token stream) is reproducible."""
    if _is_hf_dataset_dir(folder):
        yield Unit("hf", folder)
        return
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise DataError(f"cannot list folder {folder}: {e.strerror or e}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue  # .git, .complete markers, editor droppings
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file():
            unit = _unit_for_file(entry)
            if unit is not None:
                yield unit


def resolve_sources(sources: Sequence[str | os.PathLike]) -> list[Unit]:
    """Expand sources to units up front, so a bad path fails before any tokenising."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    units: list[Unit] = []
    for src in sources:
        path = Path(src).expanduser()
        if not path.exists():
            raise DataError(f"data source not found: {src}")
        if path.is_dir():
            found = list(_walk(path))
            if not found:
                raise DataError(f"no supported files in {src} (expected {SUPPORTED})")
            units.extend(found)
        else:
            unit = _unit_for_file(path)
            if unit is None:
                raise DataError(f"unsupported data file {src} (expected {SUPPORTED})")
            units.append(unit)
    return units


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"cannot read {path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _jsonl_documents(path: Path) -> Iterator[str]:
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"cannot read {path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict) or "text" not in record:
                    raise DataError(f"cannot read {path}:{lineno}: no 'text' field")
                text = record["text"]
                if not isinstance(text, str):
                    raise DataError(f"cannot read {path}:{lineno}: 'text' is not a string")
                yield text
        except UnicodeDecodeError:
            raise DataError(f"cannot read {path}: not valid UTF-8 (near line {lineno + 1})") from None


def _hf_documents(path: Path) -> Iterator[str]:
    import datasets  # slow import: only when a saved dataset is actually used

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises a variety of types for a corrupt folder
        raise DataError(f"cannot read dataset {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise DataError(f"cannot read dataset {path}: it has no splits")
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if "text" not in ds.column_names:
        raise DataError(f"dataset {path} has no 'text' column (columns: {', '.join(ds.column_names)})")
    for batch in ds.select_columns(["text"]).iter(batch_size=1000):
        for text in batch["text"]:
            if isinstance(text, str):
                yield text


def unit_documents(unit: Unit) -> Iterator[str]:
    """Documents of one unit, skipping blank ones (they would only add stray EOS tokens)."""
    if unit.kind == "text":
        docs: Iterator[str] = iter([_read_text(unit.path)])
    elif unit.kind == "jsonl":
        docs = _jsonl_documents(unit.path)
    else:
        docs = _hf_documents(unit.path)
    for doc in docs:
        if doc.strip():
            yield doc


def iter_documents(sources: Sequence[str | os.PathLike] | str | os.PathLike) -> Iterator[str]:
    """Yield every non-blank document of the sources, in a reproducible order.

    A .txt/.md/.rst file is one document; a .jsonl line or a dataset row is one document.
    """
    yield from units_documents(resolve_sources(sources))


def units_documents(units: Sequence[Unit]) -> Iterator[str]:
    """Documents of resolved units, read in turn."""
    for unit in units:
        yield from unit_documents(unit)


def doc_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def is_heldout(text: str, fraction: float) -> bool:
    """Document-level split: a function of the text alone, so duplicates share a side."""
    if fraction <= 0:
        return False
    return int.from_bytes(doc_hash(text), "big") / 2.0**64 < fraction
