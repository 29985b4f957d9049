"""Where recursify keeps files: the cache root, and folders written all at once."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(target: Path):
    """Yield a temporary sibling folder to write into; on success it replaces `target` in one
    rename, on failure it is removed, so `target` is always either the old or the complete new one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def cache_root() -> Path:
    """$RECURSIFY_CACHE, else ~/.cache/recursify: models assembled from wheels, calibration statistics."""
    root = os.environ.get("RECURSIFY_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "recursify"
