"""Files every layer of cnnlab writes or finds: atomic writes and the cache root (no JAX)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ENV_CACHE_DIR = "CNNLAB_CACHE_DIR"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to a temporary file in the same directory (mode 0644), then renames it
    over ``path``, so a reader sees the old or the new file, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$CNNLAB_CACHE_DIR``, else ``~/.cache/cnnlab``."""
    if cache_dir:
        return Path(os.path.expanduser(str(cache_dir)))
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(os.path.expanduser(env))
    return Path.home() / ".cache" / "cnnlab"
