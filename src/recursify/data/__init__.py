"""Text data for training, evaluation and the report: read sources (`sources`), tokenise once into an
on-disk token cache (`cache`), serve packed sequences and batches (`batches`).

Pipeline::

    sources --mixed_documents--> documents --tokenizer--> train / held-out token streams
        (EOS between documents)  --> .npy shards in a cache dir --> PackedDataset (memmap) --> batches()

Design points training and evaluation rely on:

* The held-out split is made per *document* from a hash of its text, so it is stable across runs,
  seeds and sequence lengths, and a document (or an exact duplicate of it) is never on both sides.
* The held-out split does not depend on ``max_tokens``: reading goes on past the training budget
  (tokenising only held-out documents) until the held-out side has ``heldout_tokens`` or the
  sources run out, so a small budget on a large corpus still gets its held-out text.
* Several training sources are interleaved in proportion to their sizes (`cache.mixed_documents`),
  so a ``max_tokens`` cap keeps every source instead of the first ones.
* The cache is keyed on the inputs (files with their sizes/mtimes, tokenizer, split settings), not
  on ``seq_len``: sequences are cut when reading, so changing ``seq_len`` reuses the cache.
* ``batches`` is a pure function of (seed, step), which is what makes checkpoint resume and
  multi-rank sharding exact.
"""

from .batches import PackedDataset, batches, build_datasets, overlap_report
from .cache import CACHE_VERSION, DataConfig, default_cache_dir
from .sources import DataError, is_heldout, iter_documents

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
