"""Catalog, model resolution and `pull`: verified, atomic, a no-op when present, offline after."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from hybridllm import catalog
from hybridllm.errors import DownloadError, ModelNotFoundError


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HYBRIDLLM_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


def _fake_entry(tmp_path: Path, chunks: list[bytes], sha: str | None = None) -> catalog.CatalogEntry:
    """A catalog entry whose 'wheels' are local zip files holding the chunks."""
    parts = []
    for i, chunk in enumerate(chunks):
        wheel = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{i}/data/model.part{i}", chunk)
        parts.append(catalog.WheelPart(str(wheel), f"fake_part{i}/data/model.part{i}"))
    blob = b"".join(chunks)
    return catalog.CatalogEntry(
        name="fake", description="fake", filename="fake.gguf", size=len(blob),
        sha256=sha or hashlib.sha256(blob).hexdigest(), parts=tuple(parts),
    )  # fmt: skip


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models_dir: Path):  # noqa: ANN201
    """Route pull() to local wheels instead of pip, so these tests need no network."""

    def install(item: catalog.CatalogEntry) -> catalog.CatalogEntry:
        monkeypatch.setattr(catalog, "catalog", lambda: {"fake": item})
        monkeypatch.setattr(catalog, "_download_wheel", lambda part, dest, quiet: Path(part.wheel))
        return item

    return install


def test_catalog_lists_both_real_models() -> None:
    names = catalog.catalog()
    assert {"smollm2-135m", "gemma3-270m"} <= set(names)
    assert names["gemma3-270m"].sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert len(names["gemma3-270m"].parts) == 4


def test_models_dir_override(models_dir: Path) -> None:
    assert catalog.models_dir() == models_dir


def test_pull_concatenates_verifies_and_is_idempotent(tmp_path: Path, fake) -> None:  # noqa: ANN001
    item = fake(_fake_entry(tmp_path, [b"GGUF" + b"a" * 3000, b"b" * 5000, b"c" * 7]))
    seen = []
    path = catalog.pull("fake", progress=lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == b"GGUF" + b"a" * 3000 + b"b" * 5000 + b"c" * 7
    assert seen[-1] == (item.size, item.size)
    mtime = path.stat().st_mtime_ns
    assert catalog.pull("fake") == path and path.stat().st_mtime_ns == mtime  # no-op
    assert catalog.resolve_model("fake") == path


def test_pull_checksum_mismatch_leaves_nothing(tmp_path: Path, fake, models_dir: Path) -> None:  # noqa: ANN001
    fake(_fake_entry(tmp_path, [b"x" * 100, b"y" * 100], sha="0" * 64))
    with pytest.raises(DownloadError, match="does not verify"):
        catalog.pull("fake")
    assert list(models_dir.iterdir()) == []


def test_pull_interrupted_leaves_nothing(tmp_path: Path, fake, models_dir: Path) -> None:  # noqa: ANN001
    fake(_fake_entry(tmp_path, [b"x" * (3 << 20)]))

    def ctrl_c(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        catalog.pull("fake", progress=ctrl_c)
    assert list(models_dir.iterdir()) == []


def test_resolve_model_errors(models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="hybridllm pull smollm2-135m"):
        catalog.resolve_model("smollm2-135m")  # in the catalog, not downloaded
    with pytest.raises(ModelNotFoundError, match="gemma3-270m, smollm2-135m"):
        catalog.resolve_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="no such model file"):
        catalog.resolve_model(tmp_path / "missing.gguf")
    real = tmp_path / "any.gguf"
    real.write_bytes(b"x")
    assert catalog.resolve_model(str(real)) == real


def test_pull_unknown_name(models_dir: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not a catalog model"):
        catalog.pull("nope")
