"""llama.cpp's vocab-only test GGUFs (models/ggml-vocab-*.gguf with .inp/.out), found or fetched.

llama.cpp ships, per tokenizer family, a vocab-only GGUF and test strings (`.inp`, cases
separated by a marker line) with the ids llama.cpp gives them (`.out`, one case per line,
tokenized without BOS/EOS and without parsing special tokens). They are ~80 MB, so they are not
in our repository: they come from the pinned llama-cpp-python sdist, which vendors llama.cpp,
and are cached under the user cache folder. dev/avx2-pair's extracted llama.cpp is used as is
when it is there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from hybridllm._user_cache import user_cache_dir

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_SEPARATOR = "\n__ggml_vocab_test__\n"
_PREFIX = "ggml-vocab-"
_ROOT = Path(__file__).resolve().parent.parent


class VocabsUnavailable(RuntimeError):
    """The vocab files are neither cached nor obtainable (offline, pip failed)."""


def cache_dir() -> Path:
    return user_cache_dir() / f"llama-cpp-vocabs-{LLAMA_CPP_PYTHON_VERSION}"


def _complete(folder: Path) -> bool:
    return (folder / f"{_PREFIX}llama-bpe.gguf.out").is_file()


def vocab_dir() -> Path:
    """A folder holding ggml-vocab-*.gguf and their .inp/.out files, fetching them on first use."""
    for folder in (cache_dir(), _ROOT / "build" / "avx2-pair" / "llama.cpp" / "models"):
        if _complete(folder):
            return folder
    _fetch_into(cache_dir())
    return cache_dir()


def _fetch_into(dest: Path) -> None:
    """Download the sdist with pip, extract only models/ggml-vocab-*, then move it into place."""
    with tempfile.TemporaryDirectory() as tmp:
        # --no-binary for this package only: with :all: pip would also build the sdist's build
        # tools (cmake) from source just to read its metadata
        cmd = [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps",
            "--no-binary", "llama-cpp-python",
            "--disable-pip-version-check", "-d", tmp,
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no sdist"]
            raise VocabsUnavailable(
                f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}: {tail[0]}"
            )
        staging = Path(tmp) / "vocabs"
        staging.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if (
                    member.isfile()
                    and name.parent.name == "models"
                    and name.name.startswith(_PREFIX)
                ):
                    source = tar.extractfile(member)
                    assert source is not None
                    with source, open(staging / name.name, "wb") as out:
                        shutil.copyfileobj(source, out)
        if not _complete(staging):
            raise VocabsUnavailable(f"{sdists[0].name} has no models/{_PREFIX}llama-bpe.gguf.out")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(staging), dest)


def read_cases(gguf: Path) -> list[tuple[str, list[int]]]:
    """(text, llama.cpp's ids) for each case of `gguf`'s .inp/.out pair."""
    # bytes, not read_text: universal newlines would turn a case's "\r\n" into "\n"
    texts = Path(f"{gguf}.inp").read_bytes().decode("utf-8").split(_SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()  # the file ends with the separator
    rows = Path(f"{gguf}.out").read_bytes().decode("utf-8").split("\n")
    ids = [[int(t) for t in row.split()] for row in rows[: len(texts)]]
    if len(ids) != len(texts):
        raise ValueError(f"{gguf}: {len(texts)} inputs but {len(ids)} output rows")
    return list(zip(texts, ids, strict=True))
