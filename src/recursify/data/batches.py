"""Reading the cache: fixed-length sequences over memory-mapped shards, and batches that are a
pure function of (seed, step), which is what makes checkpoint resume and multi-rank sharding exact.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterator, Sequence

import numpy as np
import torch

from .cache import DataConfig, build_cache
from .sources import DataError


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
    folder, meta = build_cache(cfg, tokenizer)
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
