"""Where hybridllm keeps files it writes at run time: never inside its own install folder.

Numba's `cache=True` writes compiled kernels next to the source by default, i.e. into
site-packages/hybridllm/**/__pycache__. Those files outlive an uninstall, and after a later
editable install the leftover folder shadows the package (`No module named
'hybridllm.backends.cpu'`). So, before numba is imported, NUMBA_CACHE_DIR points to a folder
under the user's cache directory unless the user has set it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/hybridllm`, default `~/.cache/hybridllm`."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "hybridllm"


def numba_cache_dir() -> Path:
    """The folder Numba caches compiled kernels in (the user's NUMBA_CACHE_DIR wins)."""
    return Path(os.environ.get("NUMBA_CACHE_DIR") or user_cache_dir() / "numba")


def numba_cache_present(source_file: str | os.PathLike[str]) -> bool:
    """Whether Numba has cached kernels of this source file (its index files), found where
    Numba's UserProvidedCacheLocator puts them: <cache>/<folder name>_<sha1 of the folder>."""
    folder = os.path.dirname(os.path.abspath(source_file))
    subpath = f"{os.path.basename(folder)}_{hashlib.sha1(folder.encode()).hexdigest()}"
    cache = numba_cache_dir() / subpath
    return cache.is_dir() and any(cache.glob(f"{Path(source_file).stem}.*.nbi"))


def set_numba_cache_dir() -> None:
    """Export NUMBA_CACHE_DIR (Numba reads it once, at import) unless the user chose one. If
    numba was imported before hybridllm, its config has read the environment already: set the
    folder there too (Numba looks it up when a cached function is defined, i.e. after this)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    os.environ["NUMBA_CACHE_DIR"] = str(numba_cache_dir())
    config = sys.modules.get("numba.core.config")
    if config is not None and not getattr(config, "CACHE_DIR", ""):
        config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


set_numba_cache_dir()
