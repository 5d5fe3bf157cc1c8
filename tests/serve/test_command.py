"""``moerun serve``: what cannot work is an error line before the model loads; a real server process
answers, and SIGTERM lets the reply in flight finish before it exits."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from moerun.cli import main

TIMEOUT_S = 120


def _argv(path, *extra):
    return ["serve", str(path), "--device", "cpu", "--max-context", "96", "--max-batch", "2", *extra]


def _assert_error_line(status, err, expected):
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert expected in err, err


def test_a_checkpoint_without_a_tokenizer_is_an_error_line(checkpoints, capsys):
    status = main(_argv(checkpoints["bare"]))
    _assert_error_line(status, capsys.readouterr().err, "has no usable tokenizer")


def test_a_tokenizer_that_fails_to_load_is_an_error_line_naming_the_file(checkpoints, capsys, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["chat"], broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel"}}')  # no added_tokens
    status = main(_argv(broken))
    _assert_error_line(status, capsys.readouterr().err,
                       f"{broken} has no usable tokenizer (transformers cannot load tokenizer.json, "
                       "tokenizer_config.json: KeyError: 'added_tokens'); `moerun serve` needs one to read prompts "
                       "and write replies: repair or replace tokenizer.json, tokenizer_config.json")


def test_without_fastapi_the_error_says_how_to_install_it(checkpoints, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    status = main(_argv(checkpoints["chat"]))
    _assert_error_line(status, capsys.readouterr().err, 'pip install "moerun[serve]"')


def test_a_port_in_use_is_an_error_line_before_loading(checkpoints, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        status = main(_argv(checkpoints["chat"], "--port", str(taken.getsockname()[1])))
    _assert_error_line(status, capsys.readouterr().err, "cannot listen on 127.0.0.1:")


@pytest.mark.parametrize("extra, expected", [(["--policy", "nope.moe"], "nope.moe"),
                                             (["--vram-budget", "lots"], "cannot read vram_budget")])
def test_a_model_that_cannot_load_is_an_error_line(checkpoints, capsys, extra, expected):
    status = main(_argv(checkpoints["chat"], "--port", str(_free_port()), *extra))
    _assert_error_line(status, capsys.readouterr().err, expected)


@pytest.mark.parametrize("flag, value", [("--port", "70000"), ("--max-batch", "0"), ("--max-context", "0"),
                                         ("--shutdown-timeout", "-1"), ("--max-prefill-tokens", "0"),
                                         ("--max-queue", "-1")])
def test_out_of_range_options_are_usage_errors(checkpoints, capsys, flag, value):
    with pytest.raises(SystemExit) as done:
        main(_argv(checkpoints["chat"], flag, value))
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}" in err and "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_lets_the_reply_in_flight_finish_then_exits(checkpoints):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "moerun", *_argv(checkpoints["chat"], "--port", str(port),
                                                                       "--served-model-name", "tiny")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": "tiny", "prompt": "w1 w2", "max_tokens": 60, "ignore_eos": True, "temperature": 0,
                "stream": True}
        tokens, done = 0, False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT_S) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    if tokens == 0:
                        process.send_signal(signal.SIGTERM)  # mid-reply
                    tokens += 1
                    last = json.loads(line[6:])["choices"][0]
        assert done and tokens == 60 and last["finish_reason"] == "length"
        _, err = process.communicate(timeout=TIMEOUT_S)
        # uvicorn shuts down cleanly, then lets the signal end the process as it would have (a service
        # manager sees "stopped by SIGTERM").
        assert process.returncode == -signal.SIGTERM, err
        assert "Traceback" not in err and "moerun: serving 'tiny'" in err
        assert "Application shutdown complete" in err
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def test_serve_is_listed_with_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for option in ("--max-batch", "--max-context", "--host", "--port", "--policy", "--vram-budget",
                   "--shutdown-timeout", "--max-queue"):
        assert option in out
