"""Every file moerun writes is replaced whole or not at all; user files are read without hanging.

Faults are injected where the bytes go (``os.write``, ``os.fsync``, ``os.replace``) and, once, for
real: a file-size limit (``ulimit -f``) on ``moerun policy fmt --write``, as the issue reproduced it.
"""
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from moerun import files
from moerun.expert_predictor import ExpertPredictor
from moerun.trace.format import write_trace
from moerun.trace.workloads import synthetic_trace
from moerun.trace.sweep import write_outputs

ORIGINAL = "policy keep {\n    cache {\n        capacity = 4\n    }\n}\n" + "# padding\n" * 200
FAULTS = [errno.ENOSPC, errno.EFBIG, errno.EIO]


def _fail_on(monkeypatch, name: str, code: int) -> None:
    """``os.<name>`` raises ``code``; ``os.write`` first writes half of what it is given (a disk
    that fills up mid-file), then raises."""
    real, calls = getattr(os, name), []

    def failing(*args):
        calls.append(1)
        if name == "write" and len(calls) == 1:
            fd, data = args
            return real(fd, memoryview(data)[: max(1, len(data) // 2)])
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, name, failing)


def _writers(tmp_path):
    """Each way moerun writes a file, as (name, function(path) that writes it)."""
    trace = synthetic_trace("zipf", num_tokens=40, num_layers=2, num_experts=8, top_k=2)
    predictor = ExpertPredictor.init(num_layers=2, num_experts=8, top_k=2, hidden=8)
    rows = [dict(policy="p", capacity=2, hit_rate=0.5, misses=1, bytes_fetched=1, cpu_share=0.0, estimated_ms=1.0)]
    return {
        "text": lambda p: files.write_text(p, "new text\n" * 5000),
        "trace": lambda p: write_trace(p, trace),
        "predictor": lambda p: predictor.save(p),
        "sweep json": lambda p: write_outputs(rows * 500, p, None),
        "sweep plot": lambda p: write_outputs(rows, None, p),
    }


@pytest.mark.parametrize("code", FAULTS, ids=[errno.errorcode[c] for c in FAULTS])
@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
@pytest.mark.parametrize("writer", ["text", "trace", "predictor", "sweep json", "sweep plot"])
def test_a_failed_write_leaves_the_original_intact(tmp_path, monkeypatch, writer, where, code):
    target = tmp_path / "out.bin"
    target.write_text(ORIGINAL)
    write = _writers(tmp_path)[writer]
    _fail_on(monkeypatch, where, code)
    with pytest.raises(OSError) as err:
        write(target)
    monkeypatch.undo()
    assert target.read_text() == ORIGINAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temporary left behind
    message = str(err.value)
    assert "\n" not in message and str(target) in message and "unchanged" in message
    assert err.value.errno == code


@pytest.mark.parametrize("writer", ["text", "trace", "predictor", "sweep json", "sweep plot"])
def test_a_write_that_fails_creates_nothing(tmp_path, monkeypatch, writer):
    target = tmp_path / "new.bin"
    _fail_on(monkeypatch, "fsync", errno.EIO)
    with pytest.raises(OSError, match="was not created"):
        _writers(tmp_path)[writer](target)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_mid_write_leaves_the_original_intact(tmp_path):
    target = tmp_path / "keep.moe"
    target.write_text(ORIGINAL)
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_write(target, text=True) as f:
            f.write("half")
            raise KeyboardInterrupt
    assert target.read_text() == ORIGINAL and [p.name for p in tmp_path.iterdir()] == ["keep.moe"]


def test_a_write_keeps_permissions_and_follows_a_symlink(tmp_path):
    real = tmp_path / "real.moe"
    real.write_text(ORIGINAL)
    real.chmod(0o640)
    link = tmp_path / "link.moe"
    link.symlink_to(real)
    files.write_text(link, "new\n")
    assert link.is_symlink() and real.read_text() == "new\n"
    assert real.stat().st_mode & 0o777 == 0o640


def test_a_write_into_a_missing_directory_is_one_line(tmp_path):
    with pytest.raises(OSError) as err:
        files.write_text(tmp_path / "no" / "such" / "file.json", "{}")
    assert "\n" not in str(err.value) and "cannot write" in str(err.value)
    with pytest.raises(OSError, match="does not exist"):
        files.check_writable(tmp_path / "no" / "file.json")
    with pytest.raises(OSError, match="is a directory"):
        files.check_writable(tmp_path)


def test_reads_refuse_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.moe"
    os.mkfifo(fifo)
    done = []

    def read():  # in a thread: if the check were missing, open() would block for a writer
        with pytest.raises(OSError, match="FIFO"):
            files.read_text(fifo, limit_bytes=100)
        done.append(True)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=60)
    if not done:  # unblock the reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert done, "reading a FIFO blocked"
    with pytest.raises(OSError, match="character device"):
        files.read_text("/dev/zero", limit_bytes=100)
    with pytest.raises(OSError, match="directory"):
        files.read_text(tmp_path, limit_bytes=100)
    with pytest.raises(OSError, match="No such file"):
        files.read_text(tmp_path / "missing", limit_bytes=100)


def test_reads_stop_at_the_limit(tmp_path):
    big = tmp_path / "big.moe"
    big.write_bytes(b"#" * 101)
    with pytest.raises(OSError, match="larger than 100 bytes"):
        files.read_text(big, limit_bytes=100)
    assert files.read_text(big, limit_bytes=101) == "#" * 101
    big.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        files.read_text(big, limit_bytes=100)


@pytest.mark.parametrize("content", [
    b"", b"PK\x03\x04garbage", b"\x93NUMPY", b"not a zip at all" * 10,
], ids=["empty", "zip-head", "npy-head", "text"])
def test_read_npz_turns_corrupt_files_into_value_errors(tmp_path, content):
    f = tmp_path / "x.npz"
    f.write_bytes(content)
    with pytest.raises(ValueError) as err:
        files.read_npz(f, "trace")
    assert "\n" not in str(err.value)


def test_read_npz_wants_a_json_object_as_meta(tmp_path):
    cases = {"npy": None, "no meta": dict(a=np.zeros(2)), "list meta": dict(meta=np.array(json.dumps([1]))),
             "numeric meta": dict(meta=np.zeros(3)), "bad json": dict(meta=np.array("{"))}
    for name, arrays in cases.items():
        f = tmp_path / f"{name}.npz"
        with open(f, "wb") as out:
            if arrays is None:
                np.save(out, np.zeros(3))
            else:
                np.savez(out, **arrays)
        with pytest.raises(ValueError):
            files.read_npz(f, "trace")
    with open(tmp_path / "ok.npz", "wb") as out:
        np.savez(out, meta=np.array(json.dumps({"a": 1})), x=np.arange(3))
    arrays, meta = files.read_npz(tmp_path / "ok.npz", "trace")
    assert meta == {"a": 1} and arrays["x"].tolist() == [0, 1, 2]


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))


def test_fmt_write_under_a_file_size_limit_keeps_the_policy(tmp_path):
    # The reproduction: ( trap '' XFSZ; ulimit -f 1; moerun policy fmt --write keep.moe )
    policy = tmp_path / "keep.moe"
    text = "policy keep { cache { capacity = 4 } }\n" + "# a comment that fmt keeps\n" * 100
    policy.write_text(text)
    done = subprocess.run([sys.executable, "-m", "moerun", "policy", "fmt", "--write", str(policy)],
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert done.returncode == 1, done.stderr
    assert policy.read_text() == text
    assert done.stderr.count("\n") == 1 and "File too large" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.moe"]


@pytest.mark.parametrize("content, kind", [(b"meta = {}\n", "text"), (b"", "empty"), (b"\x00\x01\x02binary", "not a zip")])
def test_an_npz_reader_names_a_file_that_is_no_archive_and_never_advises_pickles(tmp_path, content, kind):
    from moerun.files import read_npz

    path = tmp_path / "x.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        read_npz(path, "expert predictor", about="a predictor is what `moerun trace predictor` writes")
    message = str(err.value)
    assert message.startswith(f"{path} is not a moerun expert predictor: the file is {kind}")
    assert message.endswith("a predictor is what `moerun trace predictor` writes") and "pickle" not in message
