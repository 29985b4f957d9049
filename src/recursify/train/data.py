"""Training data: read text sources, tokenise once into an on-disk token cache, serve packed sequences.

Pipeline::

    sources --iter_documents--> documents --tokenizer--> train / held-out token streams
        (EOS between documents)  --> .npy shards in a cache dir --> PackedDataset (memmap) --> batches()

Design points the trainer relies on:

* The held-out split is made per *document* from a hash of its text, so it is stable across runs,
  seeds and sequence lengths, and a document (or an exact duplicate of it) is never on both sides.
* The held-out split does not depend on ``max_tokens``: reading goes on past the training budget
  (tokenising only held-out documents) until the held-out side has ``heldout_tokens`` or the
  sources run out, so a small budget on a large corpus still gets its held-out text.
* The cache is keyed on the inputs (files with their sizes/mtimes, tokenizer, split settings), not
  on ``seq_len``: sequences are cut when reading, so changing ``seq_len`` reuses the cache.
* ``batches`` is a pure function of (seed, step), which is what makes checkpoint resume and
  multi-rank sharding exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "CACHE_VERSION",
    "DataConfig",
    "DataError",
    "PackedDataset",
    "batches",
    "build_datasets",
    "default_cache_dir",
    "is_heldout",
    "iter_documents",
    "overlap_report",
]

# Bump when the on-disk format or the packing rules change: old caches are then ignored.
# 2: the held-out side is read past the training budget (v1 caches stopped at max_tokens).
CACHE_VERSION = 2

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED = "'.txt', '.md', '.rst', '.jsonl' files or a datasets save_to_disk folder"

# Documents handed to the tokenizer per call: big enough to amortise call overhead, small enough
# that one batch of long documents stays a few MB.
_TOKENIZE_BATCH_DOCS = 256
_TOKENIZE_BATCH_CHARS = 4_000_000


class DataError(ValueError):
    """Bad data input; the message is one line meant for the user."""


@dataclass
class DataConfig:
    """What to train on and how to cut it.

    ``heldout_sources``: when given, these sources are the held-out set and ``sources`` are all
    training (documents whose text also occurs in the held-out set are dropped from training);
    ``heldout_fraction`` is then ignored. ``seed`` is not used to build the data (the split is
    seed-independent on purpose); it is the seed the trainer should pass to :func:`batches`.

    ``max_tokens`` caps the training stream only. ``heldout_tokens`` caps the held-out stream (at
    least one ``seq_len`` is always kept); ``None`` keeps every held-out document. Either way the
    held-out stream is the same whatever ``max_tokens`` is.
    """

    sources: list[str]
    seq_len: int = 512
    heldout_fraction: float = 0.05
    seed: int = 0
    cache_dir: str | None = None
    max_tokens: int | None = None
    heldout_sources: list[str] | None = None
    heldout_tokens: int | None = None
    shard_tokens: int = 1 << 24
    tokenize_batch_docs: int = _TOKENIZE_BATCH_DOCS

    def __post_init__(self) -> None:
        if isinstance(self.sources, (str, os.PathLike)):
            self.sources = [self.sources]
        self.sources = [str(s) for s in self.sources]
        if isinstance(self.heldout_sources, (str, os.PathLike)):
            self.heldout_sources = [self.heldout_sources]
        if self.heldout_sources is not None:
            self.heldout_sources = [str(s) for s in self.heldout_sources]
        if not self.sources:
            raise DataError("no data sources given")
        if self.seq_len < 2:
            raise DataError(f"seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise DataError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise DataError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.heldout_tokens is not None and self.heldout_tokens < 1:
            raise DataError(f"heldout_tokens must be positive, got {self.heldout_tokens}")
        if self.shard_tokens < 1:
            raise DataError(f"shard_tokens must be positive, got {self.shard_tokens}")

    @property
    def heldout_cap(self) -> int | None:
        """Held-out tokens to read: ``heldout_tokens`` raised to one sequence (None: all)."""
        return None if self.heldout_tokens is None else max(self.heldout_tokens, self.seq_len)


def default_cache_dir() -> Path:
    """``$RECURSIFY_CACHE/tokens`` if set, else ``~/.cache/recursify/tokens``."""
    from ..hub import cache_root

    return cache_root() / "tokens"


# --------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """One thing read as a whole: a text file, a jsonl file or a saved HF dataset folder."""

    kind: str  # "text" | "jsonl" | "hf"
    path: Path


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def _unit_for_file(path: Path) -> _Unit | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _Unit("text", path)
    if suffix in JSONL_SUFFIXES:
        return _Unit("jsonl", path)
    return None


def _walk(folder: Path) -> Iterator[_Unit]:
    """Sorted walk so the document order (and so the token stream) is reproducible."""
    if _is_hf_dataset_dir(folder):
        yield _Unit("hf", folder)
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


def _resolve(sources: Sequence[str | os.PathLike]) -> list[_Unit]:
    """Expand sources to units up front, so a bad path fails before any tokenising."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    units: list[_Unit] = []
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


def _unit_documents(unit: _Unit) -> Iterator[str]:
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
    for unit in _resolve(sources):
        yield from _unit_documents(unit)


def _doc_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def is_heldout(text: str, fraction: float) -> bool:
    """Document-level split: a function of the text alone, so duplicates share a side."""
    if fraction <= 0:
        return False
    return int.from_bytes(_doc_hash(text), "big") / 2.0**64 < fraction


# --------------------------------------------------------------------------------------------
# Tokenising into the cache
# --------------------------------------------------------------------------------------------


def _stat_record(units: list[_Unit]) -> list:
    """Paths + sizes + mtimes: cheap to compute and changes whenever a file is edited."""
    out = []
    for unit in units:
        files = [unit.path] if unit.kind != "hf" else sorted(p for p in unit.path.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            out.append([unit.kind, str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _tokenizer_record(tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    vocab_hash = hashlib.blake2b(
        json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8"), digest_size=16
    ).hexdigest()
    return {
        "class": type(tokenizer).__name__,
        "name": getattr(tokenizer, "name_or_path", ""),
        "len": len(tokenizer),
        "eos": tokenizer.eos_token_id,
        "vocab": vocab_hash,
    }


class _StreamWriter:
    """Appends token arrays for one split and flushes them to numbered .npy shards."""

    def __init__(self, folder: Path, prefix: str, dtype, eos_id: int, shard_tokens: int):
        self.folder, self.prefix, self.dtype = folder, prefix, dtype
        self.eos = np.array([eos_id], dtype=dtype)
        self.shard_tokens = shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.num_tokens = 0
        self.num_docs = 0
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        if self.num_docs:  # EOS *between* documents
            self._push(self.eos)
        self._push(ids)
        self.num_docs += 1

    def _push(self, arr: np.ndarray) -> None:
        self.buffer.append(arr)
        self.buffered += len(arr)
        self.num_tokens += len(arr)
        if self.buffered >= self.shard_tokens:
            self.flush()

    def truncate_to(self, n: int) -> None:
        """Cut the stream to n tokens; only ever called on the buffered tail."""
        excess = self.num_tokens - n
        assert 0 <= excess <= self.buffered
        while excess:
            last = self.buffer[-1]
            take = min(excess, len(last))
            self.buffer[-1] = last[: len(last) - take]
            if not len(self.buffer[-1]):
                self.buffer.pop()
            excess -= take
            self.buffered -= take
            self.num_tokens -= take

    def flush(self) -> None:
        if not self.buffered:
            return
        name = f"{self.prefix}_{len(self.shards):05d}.npy"
        np.save(self.folder / name, np.concatenate(self.buffer).astype(self.dtype, copy=False))
        self.shards.append({"file": name, "tokens": self.buffered})
        self.buffer, self.buffered = [], 0


def _progress(total_bytes: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="tokenising",
        file=sys.stderr,
        disable=None,  # off when stderr is not a TTY (CI logs)
        dynamic_ncols=True,
    )


def _tokenize_into(
    tmp: Path,
    cfg: DataConfig,
    tokenizer,
    train_units: list[_Unit],
    heldout_units: list[_Unit] | None,
    dtype,
) -> dict:
    eos_id = int(tokenizer.eos_token_id)
    train = _StreamWriter(tmp, "train", dtype, eos_id, cfg.shard_tokens)
    heldout = _StreamWriter(tmp, "heldout", dtype, eos_id, cfg.shard_tokens)
    max_id = np.iinfo(dtype).max
    total_bytes = sum(r[2] for r in _stat_record(train_units + (heldout_units or [])))
    caps = {"train": cfg.max_tokens, "heldout": cfg.heldout_cap}
    writers = {"train": train, "heldout": heldout}
    counts = {"docs": 0, "tokens": 0, "dropped_dups": 0}
    heldout_hashes: set[bytes] = set()

    def full(side: str) -> bool:
        return caps[side] is not None and writers[side].num_tokens >= caps[side]

    def encode(texts: list[str]) -> list[np.ndarray]:
        # split_special_tokens: corpus text that spells "<|endoftext|>" must not forge a real EOS
        # (it would break document boundaries and so the leak guarantees).
        ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
        out = []
        for row in ids:
            arr = np.asarray(row, dtype=np.int64)
            if len(arr) and (arr.min() < 0 or arr.max() > max_id):
                raise DataError(f"tokenizer produced id {int(arr.max())} outside its vocabulary")
            out.append(arr.astype(dtype))
        return out

    def run(units: list[_Unit], route, needed: tuple[str, ...]) -> bool:
        """Read documents until every side in `needed` is full; True if the units ran out first.

        `route(text) -> side | None`. Only documents bound for a side that is not yet full are
        tokenised, so reading past the training budget costs little more than the reading.
        """
        for unit in units:
            batch: list[tuple[str, str]] = []
            chars = 0
            for doc in _unit_documents(unit):
                counts["docs"] += 1
                bar.update(len(doc))
                side = route(doc)
                if side is None or full(side):
                    continue
                batch.append((side, doc))
                chars += len(doc)
                if len(batch) >= cfg.tokenize_batch_docs or chars >= _TOKENIZE_BATCH_CHARS:
                    add(batch)
                    batch, chars = [], 0
                    if all(full(n) for n in needed):
                        return False
            if batch:
                add(batch)
            if all(full(n) for n in needed):
                return False
        return True

    def add(batch: list[tuple[str, str]]) -> None:
        for (side, _), ids in zip(batch, encode([text for _, text in batch])):
            if full(side) or not len(ids):
                continue
            counts["tokens"] += len(ids)
            writer = writers[side]
            writer.add(ids)
            if full(side):
                writer.truncate_to(caps[side])

    with _progress(total_bytes) as bar:
        if heldout_units is None:
            needed = ("train", "heldout") if cfg.heldout_fraction > 0 else ("train",)
            read_all = run(
                train_units, lambda t: "heldout" if is_heldout(t, cfg.heldout_fraction) else "train", needed
            )
        else:
            # Held-out first, so training can skip any document that is also held out.
            def route_heldout(text: str) -> str:
                heldout_hashes.add(_doc_hash(text))
                return "heldout"

            def route_train(text: str) -> str | None:
                if _doc_hash(text) in heldout_hashes:
                    counts["dropped_dups"] += 1
                    return None
                return "train"

            run(heldout_units, route_heldout, ("heldout",))
            heldout_docs_read = counts["docs"]
            read_all = run(train_units, route_train, ("train",))

    if counts["docs"] == 0:
        raise DataError("corpus is empty: the sources contain no text")
    train.flush()
    heldout.flush()
    return {
        "train": {"shards": train.shards, "tokens": train.num_tokens, "docs": train.num_docs},
        "heldout": {"shards": heldout.shards, "tokens": heldout.num_tokens, "docs": heldout.num_docs},
        "dropped_duplicate_docs": counts["dropped_dups"],
        "truncated_at_max_tokens": full("train"),
        # What was read, for true numbers in "too small" errors: documents read (all of them when
        # `read_all`), and the tokens of the documents tokenised (all of them unless truncated).
        "corpus": {"docs": counts["docs"], "tokens": counts["tokens"], "read_all": read_all,
                   **({} if heldout_units is None else {"heldout_docs": heldout_docs_read})},
    }


def _cleanup_stale_tmp(cache_root: Path, key: str) -> None:
    """Remove temp dirs of interrupted builds (this host, process gone); never trust them."""
    host = socket.gethostname()
    for tmp in cache_root.glob(f"{key}.tmp-*"):
        parts = tmp.name.split(".tmp-", 1)[1].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host:
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # still running: another process is building
        except (ProcessLookupError, ValueError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _build_cache(cfg: DataConfig, tokenizer) -> tuple[Path, dict]:
    """Return (cache folder, meta), tokenising only if no complete cache exists for these inputs."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError("the tokenizer has no EOS token; packing needs one to separate documents")
    train_units = _resolve(cfg.sources)
    heldout_units = _resolve(cfg.heldout_sources) if cfg.heldout_sources is not None else None
    tok = _tokenizer_record(tokenizer)
    vocab_top = max(tok["len"], tok["eos"] + 1)
    dtype = np.uint16 if vocab_top <= 1 << 16 else np.uint32
    key_inputs = {
        "version": CACHE_VERSION,
        "train_files": _stat_record(train_units),
        "heldout_files": _stat_record(heldout_units) if heldout_units is not None else None,
        "heldout_fraction": cfg.heldout_fraction if heldout_units is None else None,
        "max_tokens": cfg.max_tokens,
        "heldout_tokens": cfg.heldout_cap,
        "tokenizer": tok,
    }
    key = hashlib.blake2b(json.dumps(key_inputs, sort_keys=True).encode(), digest_size=16).hexdigest()
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    final = root / key
    meta_path = final / "meta.json"
    if meta_path.is_file():
        return final, json.loads(meta_path.read_text())

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create cache dir {root}: {e.strerror or e}") from None
    _cleanup_stale_tmp(root, key)
    tmp = root / f"{key}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        stats = _tokenize_into(tmp, cfg, tokenizer, train_units, heldout_units, dtype)
        meta = {**stats, "dtype": np.dtype(dtype).name, "eos_id": tok["eos"], "key_inputs": key_inputs}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)  # atomic commit: a folder named `key` is always complete
        except OSError:
            if not meta_path.is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; use theirs
            meta = json.loads(meta_path.read_text())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, meta


# --------------------------------------------------------------------------------------------
# Reading: packed sequences over memmapped shards
# --------------------------------------------------------------------------------------------


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length sequences cut from one flat token stream (which may span several shards).

    Item ``i`` is tokens ``[i*seq_len, (i+1)*seq_len)``; the incomplete tail is dropped. Items are
    ``{"input_ids": LongTensor[seq_len]}``; use ``labels = input_ids`` (the model shifts).
    """

    def __init__(self, shards: Sequence[np.ndarray], seq_len: int):
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.shards = [s for s in shards if len(s)]
        self.seq_len = int(seq_len)
        self._starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.num_tokens = int(self._starts[-1])

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], seq_len: int) -> "PackedDataset":
        """Memory-map the shards: the OS pages tokens in on demand, so RAM stays flat."""
        return cls([np.load(p, mmap_mode="r") for p in paths], seq_len)

    @classmethod
    def from_tokens(cls, tokens, seq_len: int) -> "PackedDataset":
        """An in-memory stream (tests, tiny experiments)."""
        return cls([np.asarray(tokens)], seq_len)

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def read_tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens ``[start, stop)`` of the flat stream as int64, stitched across shards."""
        stop = self.num_tokens if stop is None else min(stop, self.num_tokens)
        if start >= stop:
            return np.zeros(0, dtype=np.int64)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        i = first
        while i < len(self.shards) and self._starts[i] < stop:
            lo = max(start - self._starts[i], 0)
            hi = min(stop - self._starts[i], len(self.shards[i]))
            parts.append(np.asarray(self.shards[i][lo:hi], dtype=np.int64))
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def sequence(self, idx: int) -> np.ndarray:
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences")
        return self.read_tokens(idx * self.seq_len, (idx + 1) * self.seq_len)

    def __getitem__(self, idx: int) -> dict:
        if idx < 0:
            idx += len(self)
        return {"input_ids": torch.from_numpy(self.sequence(idx))}

    def sequence_hashes(self) -> np.ndarray:
        """8-byte blake2b of every sequence (as uint64), independent of the on-disk dtype."""
        out = np.empty(len(self), dtype=np.uint64)
        chunk = max(1, (1 << 22) // self.seq_len)  # read ~4M tokens at a time
        for first in range(0, len(self), chunk):
            last = min(first + chunk, len(self))
            block = self.read_tokens(first * self.seq_len, last * self.seq_len)
            block = block.astype("<u4").reshape(last - first, self.seq_len)
            for j, row in enumerate(block):
                digest = hashlib.blake2b(row.tobytes(), digest_size=8).digest()
                out[first + j] = int.from_bytes(digest, "little")
        return out

    def __repr__(self) -> str:
        return f"PackedDataset({len(self)} x {self.seq_len} tokens, {self.num_tokens} in stream)"


def overlap_report(train: PackedDataset, heldout: PackedDataset) -> int:
    """How many held-out sequences also occur verbatim in train (0 unless the corpus leaks)."""
    train_hashes = set(train.sequence_hashes().tolist())
    return int(sum(h in train_hashes for h in heldout.sequence_hashes().tolist()))


def _heldout_too_small(cfg: DataConfig, meta: dict, tokens: int) -> str:
    """The held-out side holds less than one sequence: give the real sizes of the corpus and that side.

    The held-out side is read until it has at least one sequence or the sources run out, so here
    they ran out: the document counts are of the whole corpus, whatever ``max_tokens`` was.
    """
    need = f"seq_len={cfg.seq_len} needs at least {cfg.seq_len} for one sequence"
    corpus = meta["corpus"]
    if cfg.heldout_sources is not None:
        return (f"corpus too small: the held-out split has {tokens} tokens (all {corpus['heldout_docs']} documents "
                f"of the held-out sources) but {need}; add held-out text, or lower seq_len")
    # Past the training budget only held-out documents are tokenised, so the total is then a floor.
    size = f"{'at least ' if meta['truncated_at_max_tokens'] else ''}{corpus['tokens']} tokens"
    return (f"corpus too small: the held-out split has {tokens} tokens ({meta['heldout']['docs']} of the corpus's "
            f"{corpus['docs']} documents, {size} in all, at heldout_fraction={cfg.heldout_fraction}) but {need}; "
            f"add text or raise heldout_fraction, or lower seq_len")


def build_datasets(cfg: DataConfig, tokenizer) -> tuple[PackedDataset, PackedDataset]:
    """Tokenise (or reuse the cache) and return (train, held-out) packed datasets."""
    folder, meta = _build_cache(cfg, tokenizer)
    datasets = {}
    for split in ("train", "heldout"):
        files = [folder / s["file"] for s in meta[split]["shards"]]
        datasets[split] = PackedDataset.from_files(files, cfg.seq_len)
    train, heldout = datasets["train"], datasets["heldout"]
    if len(train) == 0:
        raise DataError(
            f"corpus too small: the training split has {train.num_tokens} tokens but "
            f"seq_len={cfg.seq_len} needs at least {cfg.seq_len} for one sequence"
        )
    wants_heldout = cfg.heldout_sources is not None or cfg.heldout_fraction > 0
    if wants_heldout and len(heldout) == 0:
        raise DataError(_heldout_too_small(cfg, meta, heldout.num_tokens))
    return train, heldout


# --------------------------------------------------------------------------------------------
# Batching: a pure function of (seed, step)
# --------------------------------------------------------------------------------------------


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Permutation for one epoch; seeded by (seed, epoch) so each epoch reshuffles reproducibly."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(
    dataset: PackedDataset,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict]:
    """Infinite ``{"input_ids": LongTensor[batch_size // world_size, seq_len]}`` batches.

    ``batch_size`` is the GLOBAL batch. The sequence order is the concatenation of per-epoch
    permutations, and global batch ``s`` is positions ``[s*B, (s+1)*B)`` of that order (a batch
    may straddle two epochs), so starting at ``start_step`` gives exactly what an uninterrupted
    run would, and rank ``r`` takes rows ``[r*B/W, (r+1)*B/W)`` of each global batch.
    """
    n = len(dataset)
    if n == 0:
        raise DataError("cannot draw batches from an empty dataset")
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"bad rank {rank} for world_size {world_size}")
    if batch_size % world_size:
        raise DataError(f"global batch_size {batch_size} is not divisible by world_size {world_size}")
    if start_step < 0:
        raise DataError(f"start_step must be >= 0, got {start_step}")
    local = batch_size // world_size
    cached_epoch, order = -1, None
    step = start_step
    while True:
        first = step * batch_size + rank * local
        idx = np.empty(local, dtype=np.int64)
        for j, pos in enumerate(range(first, first + local)):
            epoch, k = divmod(pos, n)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, _epoch_order(n, seed, epoch)
            idx[j] = order[k]
        rows = [dataset.sequence(int(i)) for i in idx]
        yield {"input_ids": torch.from_numpy(np.stack(rows))}
        step += 1
