"""The server app in-process (Starlette's TestClient): /health while loading, a load that
fails; and `hybridllm serve`'s command-line mistakes."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from hybridllm.cli import main  # noqa: E402
from hybridllm.errors import ModelFormatError  # noqa: E402
from hybridllm.runner import Runner  # noqa: E402
from hybridllm.server.app import ServerOptions, ServerState, create_app  # noqa: E402


def test_health_is_503_while_loading_then_200(smollm_path: str) -> None:
    release = threading.Event()

    def load() -> Runner:
        release.wait()
        return Runner(smollm_path, n_ctx=128, n_threads=2)

    state = ServerState(load, ServerOptions(model_id="smollm2-135m", n_parallel=2))
    with TestClient(create_app(state)) as client:
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "unavailable_error"
        busy = client.post("/v1/completions", json={"prompt": "Hi"})
        assert busy.status_code == 503
        release.set()
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        reply = client.post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0}
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        assert client.get("/health").json()["slots_idle"] == 2


def test_a_load_that_fails_is_reported_and_stops_the_server() -> None:
    def load() -> Runner:
        raise ModelFormatError("broken.gguf: not a GGUF file")

    reported: list[str] = []
    state = ServerState(load, ServerOptions(model_id="broken"))
    state.on_load_error = reported.append
    with TestClient(create_app(state)) as client:
        deadline = time.monotonic() + 30
        while not reported:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        error = client.get("/health").json()["error"]
        assert "not a GGUF file" in error["message"]
    assert reported == ["broken.gguf: not a GGUF file"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--port", "0"], "--port"),
        (["--port", "70000"], "--port"),
        (["-np", "0"], "--parallel"),
        (["--max-queue", "-1"], "--max-queue"),
    ],
)
def test_bad_options_are_one_line_usage_errors(
    smollm_path: str, args: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", smollm_path, *args])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err


def test_a_port_in_use_is_a_usage_error(
    smollm_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", smollm_path, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_a_missing_model_is_a_usage_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    assert main(["serve", str(tmp_path / "nothing.gguf"), "--port", "1"]) == 2
    assert "nothing.gguf" in capsys.readouterr().err
