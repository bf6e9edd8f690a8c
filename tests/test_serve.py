"""``lattice serve``: a real LitServe server on a tiny Lattice checkpoint, queried over loopback HTTP. Greedy decoding
(``--top_k 1``, float32) makes the served text comparable: it must equal ``lattice generate``'s for the same prompt."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from distill_helpers import free_port
from eval_helpers import make_checkpoint, make_tokenizer

LATTICE = [sys.executable, "-m", "lattice_plugin"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GREEDY = ["--top_k", "1", "--precision", "32-true"]
MAX_NEW_TOKENS = 12
STARTUP_S = 300  # the server and its spawned inference worker each import litgpt: slow on a loaded 2-core machine
REQUEST_S = 120
STOP_S = 30


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An all-Lattice and a hybrid checkpoint; a chat template that renders the messages' text alone, so that the
    OpenAI spec's prompt is the text ``lattice generate`` gets."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer_dir = make_tokenizer(root / "tokenizer")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return {
        "lattice": make_checkpoint(root / "lattice", tokenizer_dir, seed=1),
        "hybrid": make_checkpoint(root / "hybrid", tokenizer_dir, lattice_layers="1", seed=2),
    }


def lattice_generate(checkpoint: Path, prompt: str) -> str:
    """The continuation ``lattice generate`` prints (litgpt prints its arguments, then prompt + continuation)."""
    result = subprocess.run(
        [*LATTICE, "generate", checkpoint, "--prompt", prompt, "--max_new_tokens", str(MAX_NEW_TOKENS), *GREEDY],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=STARTUP_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    start = result.stdout.index("\n" + prompt) + 1 + len(prompt)
    return result.stdout[start:].removesuffix("\n")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its LitServe workers), SIGKILL after a bounded wait; no process of the
    group may be left."""
    group = process.pid  # started in a new session: the group id is the server's pid
    with suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        process.wait(timeout=STOP_S)
    deadline = time.monotonic() + STOP_S
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    pytest.fail("lattice serve left processes behind after SIGTERM")


@contextmanager
def lattice_serve(checkpoint: Path, log_path: Path, *flags: str) -> Iterator[str]:
    """A ``lattice serve`` process on 127.0.0.1; yields its base URL once ``/health`` answers, stops it on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [*LATTICE, "serve", checkpoint, "--port", str(port), "--accelerator", "cpu", *GREEDY, *flags]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True, stdin=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert process.poll() is None, f"lattice serve exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready in {STARTUP_S} s:\n{log_path.read_text()[-3000:]}"
            with suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            time.sleep(1)
        yield url
    finally:
        stop_server(process)


def post(url: str, payload: dict) -> bytes:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=REQUEST_S) as response:
        assert response.status == 200
        return response.read()


def streamed_content(body: bytes) -> str:
    """The text of an OpenAI chat-completion stream (server-sent events, one delta per token, then [DONE])."""
    events = [line.removeprefix("data: ") for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    deltas = [json.loads(event)["choices"][0]["delta"] for event in events[:-1]]
    return "".join(delta["content"] or "" for delta in deltas)


def test_openai_spec_serves_lattice_generate_text(checkpoints, tmp_path):
    prompt = "A fortune says"
    expected = lattice_generate(checkpoints["lattice"], prompt)
    assert expected.strip()
    request = {
        "model": "lattice",
        "messages": [{"role": "user", "content": prompt}],
        "max_completion_tokens": MAX_NEW_TOKENS,  # the server's default (--max_new_tokens) is 50
    }
    with lattice_serve(checkpoints["lattice"], tmp_path / "server.log", "--openai_spec", "true") as url:
        plain = json.loads(post(f"{url}/v1/chat/completions", request))
        streamed = post(f"{url}/v1/chat/completions", {**request, "stream": True})
        again = json.loads(post(f"{url}/v1/chat/completions", request))  # the cache is reset between requests
    assert plain["choices"][0]["message"]["content"] == expected
    assert streamed_content(streamed) == expected
    assert again["choices"][0]["message"]["content"] == expected


def test_litgpt_spec_serves_hybrid(checkpoints, tmp_path):
    prompts = ["Fortune", "The longer of the two prompts"]
    expected = [lattice_generate(checkpoints["hybrid"], prompt) for prompt in prompts]
    flags = ("--max_new_tokens", str(MAX_NEW_TOKENS))
    with lattice_serve(checkpoints["hybrid"], tmp_path / "server.log", *flags) as url:
        # a longer prompt after a shorter one grows the caches; a shorter one after it reuses them
        served = [json.loads(post(f"{url}/predict", {"prompt": prompt}))["output"] for prompt in prompts + prompts[:1]]
    assert served == expected + expected[:1]


def _missing_directory(checkpoint: Path, tmp_path: Path) -> list:
    return [tmp_path / "missing"]


def _bad_config(checkpoint: Path, tmp_path: Path) -> list:
    broken = Path(shutil.copytree(checkpoint, tmp_path / "broken"))
    with open(broken / "model_config.yaml", "a") as config:
        config.write("lattice_slots: 0\n")
    return [broken]


def _several_devices(checkpoint: Path, tmp_path: Path) -> list:
    return [checkpoint, "--devices", "2"]


@pytest.mark.parametrize(
    "make_args, message",
    [(_missing_directory, "does not exist"), (_bad_config, "lattice_slots"), (_several_devices, "one device")],
)
def test_bad_input_is_one_line(checkpoints, tmp_path, make_args, message):
    result = subprocess.run(
        [*LATTICE, "serve", *make_args(checkpoints["lattice"], tmp_path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=STARTUP_S,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
