"""The token cache: sources tokenised once into .npy shards, keyed on everything that changes them.

The key covers the files (paths, sizes, mtimes), the tokenizer and the split settings, but not
``seq_len``: sequences are cut when reading, so another ``seq_len`` reuses the cache. A cache
folder is built under a temporary name and renamed when complete, so a folder named by its key
is always whole; temporary folders of builds that died are removed, never trusted.
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
from typing import Iterable, Iterator

import numpy as np

from .sources import DataError, Unit, doc_hash, is_heldout, resolve_sources, units_documents

# Bump when the on-disk format or the packing rules change: old caches are then ignored.
# 2: the held-out side is read past the training budget (v1 caches stopped at max_tokens).
# 3: several training sources are interleaved in proportion to their sizes (v2 read them in turn).
CACHE_VERSION = 3


# Documents handed to the tokenizer per call: big enough to amortise call overhead, small enough
# that one batch of long documents stays a few MB.
_TOKENIZE_BATCH_DOCS = 256
_TOKENIZE_BATCH_CHARS = 4_000_000


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
    from ..util.paths import cache_root

    return cache_root() / "tokens"


def _stat_record(units: list[Unit]) -> list:
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


def mixed_documents(groups: list[list[Unit]]) -> Iterator[str]:
    """Documents of several sources, interleaved so that each has been read in proportion to its size.

    Read in turn, a training cap (`max_tokens`) that ends inside the first source would silently
    drop the others: `--data mine,general` would train on `mine` alone. Here the next document
    always comes from the source with the smallest fraction of its bytes read so far, so a
    stream cut anywhere holds every source in proportion to its size, and an uncut stream holds
    exactly the documents of reading them in turn. One source reads as before.
    """
    sizes = [max(1, sum(r[2] for r in _stat_record(units))) for units in groups]
    streams = [units_documents(units) for units in groups]
    read = [0] * len(groups)
    live = list(range(len(groups)))
    while live:
        i = min(live, key=lambda j: (read[j] / sizes[j], j))
        doc = next(streams[i], None)
        if doc is None:
            live.remove(i)
            continue
        read[i] += len(doc.encode("utf-8"))
        yield doc


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
    train_groups: list[list[Unit]],
    heldout_units: list[Unit] | None,
    dtype,
) -> dict:
    train_units = [unit for units in train_groups for unit in units]
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

    def run(docs: Iterable[str], route, needed: tuple[str, ...]) -> bool:
        """Read documents until every side in `needed` is full; True if the documents ran out first.

        `route(text) -> side | None`. Only documents bound for a side that is not yet full are
        tokenised, so reading past the training budget costs little more than the reading.
        """
        batch: list[tuple[str, str]] = []
        chars = 0
        for doc in docs:
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
        return not all(full(n) for n in needed)

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
                mixed_documents(train_groups), lambda t: "heldout" if is_heldout(t, cfg.heldout_fraction) else "train",
                needed
            )
        else:
            # Held-out first, so training can skip any document that is also held out.
            def route_heldout(text: str) -> str:
                heldout_hashes.add(doc_hash(text))
                return "heldout"

            def route_train(text: str) -> str | None:
                if doc_hash(text) in heldout_hashes:
                    counts["dropped_dups"] += 1
                    return None
                return "train"

            run(units_documents(heldout_units), route_heldout, ("heldout",))
            heldout_docs_read = counts["docs"]
            read_all = run(mixed_documents(train_groups), route_train, ("train",))

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


def build_cache(cfg: DataConfig, tokenizer) -> tuple[Path, dict]:
    """Return (cache folder, meta), tokenising only if no complete cache exists for these inputs."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError("the tokenizer has no EOS token; packing needs one to separate documents")
    train_groups = [resolve_sources([source]) for source in cfg.sources]
    train_units = [unit for units in train_groups for unit in units]
    heldout_units = resolve_sources(cfg.heldout_sources) if cfg.heldout_sources is not None else None
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
        stats = _tokenize_into(tmp, cfg, tokenizer, train_groups, heldout_units, dtype)
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
