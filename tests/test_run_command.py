"""``moerun run``: the streamed text is the greedy generation's, the chat keeps its history through
the chat template, Ctrl-C ends a reply and not the chat, a message the template rejects is refused and
not kept, --expert-format and --dtype reach moerun.load, and bad input (flags, a missing or broken
tokenizer, a template that fails) is an error line.

A tiny fp32 qwen2_moe checkpoint on the CPU with 4 expert slots (misses happen), and a word-level
tokenizer written here: "w0".."w122" plus role markers, and a chat template.
"""
import io
import re
import shutil
import subprocess
import sys

import pytest
import torch

import moerun
import moerun.loader
from moerun import run_command
from moerun.checkpoint import CheckpointError, checkpoint_with_tokenizer
from moerun.cli import build_parser, main
from tiny_chat_checkpoint import TEMPLATE, build_chat_checkpoints
from tiny_chat_checkpoint import make_tokenizer as _tokenizer

POLICY = "policy p { cache { eviction = lru } schedule { mode = cpu_fallback } }"
NEW_TOKENS = 8
MAX_CONTEXT = 96


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"chat": with tokenizer and template, "plain": tokenizer without template, "bare": no tokenizer}."""
    return build_chat_checkpoints(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def budget(checkpoints):
    plan = moerun.memory_plan(checkpoints["chat"], vram_budget=1 << 40, device="cpu", max_context=MAX_CONTEXT)
    return str(plan.fixed_bytes + 4 * plan.slot_bytes)


@pytest.fixture(scope="module")
def reference(checkpoints, budget):
    """``reference(ids) -> new token ids``: greedy model.generate on a separately loaded model."""
    model = moerun.load(checkpoints["chat"], policy=POLICY, vram_budget=int(budget), device="cpu",
                        max_context=MAX_CONTEXT, progress=False)

    def generate(ids: torch.Tensor) -> list[int]:
        return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
    return generate


class _Writes(io.StringIO):
    """A stdout that counts its writes."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += bool(text)
        return super().write(text)


def _argv(checkpoints, budget, *extra, which="chat"):
    return ["run", str(checkpoints[which]), "--device", "cpu", "--policy", POLICY, "--vram-budget", budget,
            "--max-context", str(MAX_CONTEXT), "--max-new-tokens", str(NEW_TOKENS), *extra]


def _run(argv, stdin_text=""):
    """run_command.run on the parsed ``argv`` -> (exit status, stdout, stdout's writes, stderr)."""
    args = build_parser()[0].parse_args(argv)
    out, err = _Writes(), io.StringIO()
    status = args.func(args, stdin=io.StringIO(stdin_text), stdout=out, stderr=err)
    return status, out.getvalue(), out.writes, err.getvalue()


def test_a_prompt_streams_the_greedy_completion_token_by_token(checkpoints, budget, reference):
    prompt = "w1 w2 w3 w4"
    status, out, writes, err = _run(_argv(checkpoints, budget, prompt))
    tokenizer = _tokenizer(None)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = tokenizer.decode(reference(ids), skip_special_tokens=True)
    assert status == 0
    assert out == expected + "\n"
    assert writes >= len(expected.split())  # a write per word, not one at the end
    assert re.search(r"\[\d+ tokens?, [\d.]+ tok/s, first token [\d.]+ s, expert cache hit rate [\d.]+%\]", err), err
    assert "moerun: loaded in" in err


def test_the_cli_takes_the_prompt_after_options(checkpoints, budget, reference, capsys):
    # MODEL, then options, then PROMPT: argparse alone would leave PROMPT over
    assert main(_argv(checkpoints, budget, "w5 w6")) == 0
    tokenizer = _tokenizer(None)
    expected = tokenizer.decode(reference(tokenizer("w5 w6", return_tensors="pt").input_ids), skip_special_tokens=True)
    assert capsys.readouterr().out == expected + "\n"


def _recording_replies(monkeypatch):
    """Every reply()'s prompt ids and returned tokens, in order."""
    calls, reply = [], run_command.reply

    def recording(model, tokenizer, ids, *args):
        tokens, interrupted = reply(model, tokenizer, ids, *args)
        calls.append((ids[0].tolist(), tokens, interrupted))
        return tokens, interrupted
    monkeypatch.setattr(run_command, "reply", recording)
    return calls


def _chat_prompt(messages) -> list[int]:
    tokenizer = _tokenizer(TEMPLATE)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_the_chat_answers_two_turns_and_keeps_the_history(checkpoints, budget, reference, monkeypatch):
    calls = _recording_replies(monkeypatch)
    status, out, _, err = _run(_argv(checkpoints, budget), "w1 w2\n\nw7 w8\n/exit\nw9\n")
    assert status == 0
    assert len(calls) == 2  # the blank line is no turn; nothing after /exit
    (prompt1, reply1, _), (prompt2, reply2, _) = calls
    decode = _tokenizer(TEMPLATE).decode
    first = decode(reply1, skip_special_tokens=True)
    assert prompt1 == _chat_prompt([{"role": "user", "content": "w1 w2"}])
    assert prompt2 == _chat_prompt([{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": first},
                                    {"role": "user", "content": "w7 w8"}])
    assert reply1 == reference(torch.tensor([prompt1])) and reply2 == reference(torch.tensor([prompt2]))
    second = decode(reply2, skip_special_tokens=True)
    assert out == f">>> {first}\n>>> >>> {second}\n>>> "  # the blank line gets a new prompt
    assert err.count("tok/s") == 2


def test_clear_forgets_the_conversation(checkpoints, budget, monkeypatch):
    calls = _recording_replies(monkeypatch)
    assert _run(_argv(checkpoints, budget), "w1 w2\n/clear\nw7 w8\n")[0] == 0
    assert [prompt for prompt, _, _ in calls] == [_chat_prompt([{"role": "user", "content": "w1 w2"}]),
                                                  _chat_prompt([{"role": "user", "content": "w7 w8"}])]


class _CtrlCOnce(io.StringIO):
    """A stdin whose first read is cut by Ctrl-C."""

    def readline(self, *args):
        if not getattr(self, "interrupted", False):
            self.interrupted = True
            raise KeyboardInterrupt
        return super().readline(*args)


def test_ctrl_c_at_the_prompt_asks_again(checkpoints, budget, monkeypatch):
    calls = _recording_replies(monkeypatch)
    args = build_parser()[0].parse_args(_argv(checkpoints, budget))
    out, err = io.StringIO(), io.StringIO()
    assert args.func(args, stdin=_CtrlCOnce("w1\n"), stdout=out, stderr=err) == 0
    assert len(calls) == 1 and out.getvalue().startswith(">>> >>> ")
    assert "/exit or press Ctrl-D to quit" in err.getvalue()


def test_end_of_input_ends_the_chat(checkpoints, budget, monkeypatch):
    calls = _recording_replies(monkeypatch)
    assert _run(_argv(checkpoints, budget), "w1\n")[0] == 0
    assert len(calls) == 1


def test_ctrl_c_during_a_reply_returns_to_the_prompt(checkpoints, budget, reference, monkeypatch):
    calls = _recording_replies(monkeypatch)
    put, seen = run_command.TerminalStreamer.put, []

    def put_until_ctrl_c(self, value):  # the first reply is cut after two of its tokens
        if not self._text.next_tokens_are_prompt:
            seen.append(value)
            if len(seen) == 3:
                raise KeyboardInterrupt
        put(self, value)
    monkeypatch.setattr(run_command.TerminalStreamer, "put", put_until_ctrl_c)
    status, out, _, err = _run(_argv(checkpoints, budget), "w1 w2\nw7 w8\n")
    assert status == 0
    (prompt1, reply1, cut1), (prompt2, reply2, cut2) = calls
    assert cut1 and not cut2
    assert reply1 == reference(torch.tensor([prompt1]))[:2]
    partial = _tokenizer(TEMPLATE).decode(reply1, skip_special_tokens=True)
    assert out.startswith(f">>> {partial}\n>>> ")
    assert "interrupted]" in err
    # the cut reply stays in the history, and the model answers the next turn as an uncut one would
    assert prompt2 == _chat_prompt([{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": partial},
                                    {"role": "user", "content": "w7 w8"}])
    assert reply2 == reference(torch.tensor([prompt2]))


def test_seeded_sampling_repeats_itself(checkpoints, budget):
    argv = _argv(checkpoints, budget, "--temperature", "1.5", "--top-k", "50", "--top-p", "0.9", "--seed", "7", "w3")
    first, second = _run(argv), _run(argv)
    assert first[0] == 0 and first[1] == second[1] and first[1].strip()


def _assert_error_line(status, err, expected):
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert expected in err, err


MISSING_TOKENIZER = "no usable tokenizer (its vocabulary is empty); `moerun run` needs one to turn text into " \
                    "tokens: add the model's tokenizer files to the checkpoint directory"
NOT_JSON = "tokenizer.json is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2"
NO_ADDED_TOKENS = "transformers cannot load tokenizer.json, tokenizer_config.json: KeyError: 'added_tokens'"
REPAIR = "e.g. with the tokenizer files of the model this checkpoint was made from"
ROLES_MUST_ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."


@pytest.fixture(scope="module")
def broken(checkpoints, tmp_path_factory):
    """Copies of the chat checkpoint with one file replaced: {"not_json", "no_added_tokens": a broken
    tokenizer.json; "refuses_w9": a template that rejects a message holding w9; "template_raises": one that
    rejects every conversation}."""
    root = tmp_path_factory.mktemp("broken")
    refuses_w9 = ("{% for m in messages %}{% if 'w9' in m['content'] %}{{ raise_exception('"
                  + ROLES_MUST_ALTERNATE + "') }}{% endif %}{% endfor %}" + TEMPLATE)
    files = {"not_json": ("tokenizer.json", "{not json"),
             "no_added_tokens": ("tokenizer.json", '{"version": "1.0", "model": {"type": "WordLevel"}}'),
             "refuses_w9": ("chat_template.jinja", refuses_w9),
             "template_raises": ("chat_template.jinja", "{{ raise_exception('this template is unfinished') }}")}
    paths = {}
    for name, (file, text) in files.items():
        paths[name] = root / name
        shutil.copytree(checkpoints["chat"], paths[name])
        (paths[name] / file).write_text(text)
    return paths


@pytest.mark.parametrize("which, prompt, expected", [
    ("bare", ["w1"], MISSING_TOKENIZER),
    ("bare", [], MISSING_TOKENIZER),
    ("plain", [], "no chat template"),
])
def test_a_checkpoint_that_cannot_talk_is_an_error_line(checkpoints, budget, capsys, which, prompt, expected):
    status = main(_argv(checkpoints, budget, *prompt, which=which))
    out, err = capsys.readouterr()
    assert out == ""
    _assert_error_line(status, err, expected)


@pytest.mark.parametrize("which, fault, repair", [("not_json", NOT_JSON, "repair or replace tokenizer.json, "),
                                                  ("no_added_tokens", NO_ADDED_TOKENS,
                                                   "repair or replace tokenizer.json, tokenizer_config.json, ")])
def test_a_tokenizer_that_fails_to_load_is_named_with_its_fault(broken, which, fault, repair):
    with pytest.raises(CheckpointError) as raised:
        checkpoint_with_tokenizer(broken[which], "it is needed")
    message = str(raised.value)
    assert message.startswith(f"{broken[which]} has no usable tokenizer ({fault}")
    assert f"; it is needed: {repair}{REPAIR}" in message and "\n" not in message
    assert "add the model's tokenizer files" not in message  # they are there


@pytest.mark.parametrize("which, fault", [("not_json", NOT_JSON), ("no_added_tokens", NO_ADDED_TOKENS)])
@pytest.mark.parametrize("prompt", [["w1"], []])
def test_a_broken_tokenizer_is_an_error_line(broken, budget, capsys, which, fault, prompt):
    status = main(_argv(broken, budget, *prompt, which=which))
    out, err = capsys.readouterr()
    assert out == ""
    _assert_error_line(status, err, f"error: {broken[which]} has no usable tokenizer ({fault}")
    assert REPAIR in err


def test_a_message_the_template_rejects_is_refused_and_the_chat_goes_on(broken, budget, monkeypatch):
    calls = _recording_replies(monkeypatch)
    status, out, _, err = _run(_argv(broken, budget, which="refuses_w9"), "w1 w2\nw9 w3\nw7 w8\n")
    assert status == 0
    assert f"error: the chat template rejected the conversation: {ROLES_MUST_ALTERNATE}; the message was not " \
           "sent (/clear starts over)" in err
    assert out.count(">>> ") == 4 and len(calls) == 2  # three turns typed, the second refused
    (_, reply1, _), (prompt2, _, _) = calls
    first = _tokenizer(TEMPLATE).decode(reply1, skip_special_tokens=True)
    # the next turn has what came before the refused message, and not it
    assert prompt2 == _chat_prompt([{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": first},
                                    {"role": "user", "content": "w7 w8"}])


def test_a_template_that_rejects_any_conversation_is_an_error_line_before_loading(broken, budget, capsys):
    status = main(_argv(broken, budget, which="template_raises"))
    out, err = capsys.readouterr()
    assert out == ""
    _assert_error_line(status, err, "the chat template fails on a one-message conversation (this template is "
                                    "unfinished), so it cannot chat")


def test_a_prompt_is_completed_without_the_chat_template(broken, budget, capsys):
    assert main(_argv(broken, budget, "w1 w2", which="template_raises")) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("extra, expected", [
    (["--top-k", "5"], "--top-k only applies when sampling"),
    (["--temperature", "0", "--top-p", "0.5", "--seed", "1"], "--top-p, --seed only apply when sampling"),
    (["--max-context", "4", "w1 w2 w3 w4 w5"], "the prompt is 5 tokens"),
    (["--vram-budget", "lots", "w1"], "cannot read vram_budget"),
    (["--policy", "nope.moe", "w1"], "nope.moe"),
    ([""], "the prompt is empty"),
])
def test_bad_flags_are_an_error_line(checkpoints, budget, capsys, extra, expected):
    status = main(_argv(checkpoints, budget, *extra))
    _assert_error_line(status, capsys.readouterr().err, expected)


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--temperature", "nan"),
                                         ("--temperature", "inf"), ("--temperature", "warm"),
                                         ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "0"),
                                         ("--seed", "-1"), ("--max-new-tokens", "0"),
                                         ("--expert-format", "int3"), ("--dtype", "float64")])
def test_out_of_range_option_values_are_usage_errors(checkpoints, budget, capsys, flag, value):
    with pytest.raises(SystemExit) as done:
        main(_argv(checkpoints, budget, flag, value, "w1"))
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}" in err and "Traceback" not in err


def test_expert_format_and_dtype_parse_as_load_takes_them():
    parse = build_parser()[0].parse_args
    args = parse(["run", "m", "--expert-format", " INT8", "--dtype", "bf16"])
    assert (args.expert_format, args.dtype) == ("int8", torch.bfloat16)
    assert parse(["run", "m", "--dtype", "float16"]).dtype is torch.float16
    defaults = parse(["run", "m"])
    assert (defaults.expert_format, defaults.dtype) == ("auto", None)  # moerun.load's defaults


def test_expert_format_and_dtype_reach_load(checkpoints, budget, monkeypatch):
    loaded, load = [], moerun.loader.load

    def recording(*args, **kwargs):
        loaded.append(load(*args, **kwargs))
        return loaded[-1]
    monkeypatch.setattr(moerun.loader, "load", recording)
    status, out, _, err = _run(_argv(checkpoints, budget, "--expert-format", "int8", "--dtype", "bf16", "w1 w2"))
    assert status == 0 and out.strip()
    info = loaded[0].moerun.model_info
    assert (info["expert_format"], info["dtype"]) == ("int8", "bfloat16")  # the checkpoint is fp32
    assert "bfloat16 compute, int8 experts" in err


def test_an_expert_format_the_checkpoint_cannot_take_is_an_error_line(checkpoints, budget, capsys):
    # bf16 experts with the fp32 checkpoint's fp32 compute: load refuses before it allocates
    status = main(_argv(checkpoints, budget, "--expert-format", "bf16", "w1"))
    _assert_error_line(status, capsys.readouterr().err, "expert_format='bf16' keeps experts in the compute dtype")


def test_a_real_process_chats_over_a_pipe(checkpoints, budget):
    done = subprocess.run([sys.executable, "-m", "moerun", *_argv(checkpoints, budget)], input="w1 w2\nw3\n",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(">>> ") == 3 and done.stderr.count("tok/s") == 2
    assert "Traceback" not in done.stderr
