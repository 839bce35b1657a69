"""The CLI's model commands: list, info (table and --json) and clean errors for bad arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridllm.cli import main


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out


def test_info_json(gemma_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", gemma_path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "gemma3" and info["hyperparameters"]["n_layers"] == 18
    assert info["tensor_types"]["Q4_K"]["tensors"] == 27
    assert len(info["block_bytes"]) == 18 and info["tokenizer"]["vocab_size"] == 262144
    assert info["context_length"] == 32768 and info["chat_template"] is False


def test_info_table_by_catalog_name(smollm_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    for text in ("llama", "Q4_1", "49152", "tied to the token embedding", "bytes per block"):
        assert text in out


def test_info_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "not-a-model"]) == 2
    assert "neither a model file nor a catalog name" in capsys.readouterr().err
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * 100)
    assert main(["info", str(junk)]) == 1  # a file that does not load: a failed run
    err = capsys.readouterr().err
    assert "junk.gguf" in err and "Traceback" not in err
