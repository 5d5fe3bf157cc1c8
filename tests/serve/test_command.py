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
import torch

import moerun
from moerun.cli import build_parser, main
from moerun.serve import command

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
                                         ("--max-queue", "-1"), ("--prefill-chunk", "0"), ("--expert-format", "int3"),
                                         ("--dtype", "int8")])
def test_out_of_range_options_are_usage_errors(checkpoints, capsys, flag, value):
    with pytest.raises(SystemExit) as done:
        main(_argv(checkpoints["chat"], flag, value))
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["1", "97"])  # below --max-batch 2, beyond --max-context 96
def test_a_prefill_chunk_the_engine_cannot_use_is_an_error_line_before_anything_else(checkpoints, capsys, value,
                                                                                      monkeypatch):
    monkeypatch.setattr(command, "require_dependencies", lambda: pytest.fail("checked after the dependencies"))
    status = main(_argv(checkpoints["chat"], "--prefill-chunk", value))
    err = capsys.readouterr().err
    _assert_error_line(status, err, "--prefill-chunk must be in 2..96 tokens")
    assert err.endswith(f"got {value}\n"), err


def test_a_bf16_expert_format_with_another_dtype_is_an_error_line(checkpoints, capsys):
    status = main(_argv(checkpoints["chat"], "--port", str(_free_port()), "--expert-format", "bf16",
                        "--dtype", "float32"))
    _assert_error_line(status, capsys.readouterr().err, "expert_format='bf16' keeps experts in the compute dtype")


@pytest.mark.parametrize("extra, expected", [
    ([], {"expert_format": "auto", "dtype": None, "prefill_chunk": 96}),
    (["--expert-format", "INT8", "--dtype", "bf16", "--prefill-chunk", "8"],
     {"expert_format": "int8", "dtype": torch.bfloat16, "prefill_chunk": 8}),
])
def test_the_options_reach_load(checkpoints, capsys, monkeypatch, extra, expected):
    from moerun.loader import LoadError

    seen = {}

    def load(path, **kwargs):
        seen.update(kwargs)
        raise LoadError("stopped before loading")

    monkeypatch.setattr("moerun.loader.load", load)
    status = main(_argv(checkpoints["chat"], "--port", str(_free_port()), *extra))
    _assert_error_line(status, capsys.readouterr().err, "stopped before loading")
    assert {key: seen[key] for key in expected} == expected
    assert seen["max_batch"] == 2 and seen["max_context"] == 96


def test_the_loaded_plan_reserves_one_prompt_of_activations_and_quantizes_the_experts(checkpoints, capsys):
    path = checkpoints["chat"]
    args = build_parser()[0].parse_args(_argv(path, "--expert-format", "int8"))
    model = command.load_model(path, args)
    assert model.moerun.memory()["experts"]["format"] == "int8"
    plan = model.moerun.plan
    budget = plan.budget_bytes

    def planned(**kw):
        return moerun.memory_plan(path, vram_budget=budget, device="cpu", max_context=96, max_batch=2,
                                  expert_format="int8", **kw)
    # One prompt of --max-context tokens, not moerun.load's default of max_batch x max_context.
    assert plan.prefill_chunk == 96 and plan.workspace_bytes == planned(prefill_chunk=96).workspace_bytes
    default = planned()
    assert default.prefill_chunk == 2 * 96 and default.workspace_bytes > plan.workspace_bytes
    assert plan.num_slots >= default.num_slots
    assert "(int8), prompts prefilled 96 tokens a forward" in capsys.readouterr().err


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
                   "--shutdown-timeout", "--max-queue", "--prefill-chunk", "--expert-format", "--dtype"):
        assert option in out
