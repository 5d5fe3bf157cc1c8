"""``moerun policy check|explain|fmt``: exit codes and output."""
import subprocess
import sys

from moerun.cli import main

GOOD = ("policy good {\n  cache { capacity = 4 eviction = lfu frequency_decay = 0.5 }  # small\n"
        "  schedule { mode = hybrid }\n}\n")
BAD = "policy bad {\n    cache { capacity = 0 eviction = lruu }\n}\n"


def test_check_ok_and_errors(tmp_path, capsys):
    good, bad = tmp_path / "good.moe", tmp_path / "bad.moe"
    good.write_text(GOOD)
    bad.write_text(BAD)
    assert main(["policy", "check", str(good), "balanced"]) == 0
    out = capsys.readouterr().out
    assert f"{good}: ok (good)" in out and "balanced.moe: ok (balanced)" in out

    assert main(["policy", "check", str(good), str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"{good}: ok" in captured.out
    err = captured.err.splitlines()
    assert err[0] == f"{bad}:2:24: error: 'cache.capacity' = 0 is out of range"
    assert err[1] == "        cache { capacity = 0 eviction = lruu }"
    assert err[2] == " " * 27 + "^"
    assert "hint: did you mean 'lru'?" in captured.err and "2 errors" in captured.err


def test_check_shape_options(tmp_path, capsys):
    f = tmp_path / "pin.moe"
    f.write_text("policy p { cache { capacity = 4 pin = [9] } }")
    assert main(["policy", "check", str(f)]) == 0
    assert main(["policy", "check", str(f), "--experts", "8"]) == 1
    assert "pinned expert 9 does not exist" in capsys.readouterr().err


def test_check_missing_file_is_an_error(capsys):
    assert main(["policy", "check", "no_such_policy"]) == 1
    assert "bundled policies: " in capsys.readouterr().err


def test_explain_gives_numbers_in_words(tmp_path, capsys):
    f = tmp_path / "good.moe"
    f.write_text(GOOD)
    assert main(["policy", "explain", str(f)]) == 0
    out = capsys.readouterr().out
    assert "keeps 4 GPU expert slots" in out and "least frequently used" in out and "x0.5" in out
    assert "wherever it finishes sooner" in out
    assert main(["policy", "explain", "balanced"]) == 0
    assert "as many GPU expert slots as the VRAM budget allows" in capsys.readouterr().out
    assert main(["policy", "explain", str(f), "--name", "other"]) == 1


def test_fmt_prints_and_writes(tmp_path, capsys):
    f = tmp_path / "good.moe"
    f.write_text(GOOD)
    assert main(["policy", "fmt", str(f)]) == 0
    formatted = capsys.readouterr().out
    assert "        capacity = 4\n" in formatted and "frequency_decay = 0.5  # small" in formatted
    assert f.read_text() == GOOD  # without --write nothing changes
    assert main(["policy", "fmt", str(f), "--write"]) == 0
    assert f.read_text() == formatted
    assert main(["policy", "fmt", str(f), "--write"]) == 0 and f.read_text() == formatted


def test_fmt_syntax_error_exit_code(tmp_path, capsys):
    f = tmp_path / "broken.moe"
    f.write_text("policy p { cache { capacity = } }")
    assert main(["policy", "fmt", str(f)]) == 1
    assert f"{f}:1:31: error: unexpected '}}'" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    f = tmp_path / "bad.moe"
    f.write_text(BAD)
    result = subprocess.run([sys.executable, "-m", "moerun", "policy", "check", str(f)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "error:" in result.stderr and "Traceback" not in result.stderr


UNFORMATTED = "policy p {   cache { capacity = 4 } }\n"


def _fmt_write_refused(argv, capsys, *expected) -> None:
    assert main(["policy", "fmt", "--write", *argv]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err


def test_fmt_write_refuses_a_read_only_file_and_leaves_it(tmp_path, capsys):
    f = tmp_path / "ro.moe"
    f.write_text(UNFORMATTED)
    f.chmod(0o444)  # (root may write any file: the mode is what the user set)
    _fmt_write_refused([str(f)], capsys, f"{f} is read-only (mode 444)", f"chmod u+w {f}", "without --write")
    assert f.read_text() == UNFORMATTED and f.stat().st_mode & 0o777 == 0o444
    f.chmod(0o644)
    assert main(["policy", "fmt", "--write", str(f)]) == 0 and f.read_text() != UNFORMATTED


def test_fmt_write_refuses_a_hard_linked_file_so_no_name_keeps_old_text(tmp_path, capsys):
    f, other = tmp_path / "a.moe", tmp_path / "b.moe"
    f.write_text(UNFORMATTED)
    other.hardlink_to(f)
    _fmt_write_refused([str(f)], capsys, f"{f} has 2 hard links", "other names would keep the old text")
    assert f.read_text() == other.read_text() == UNFORMATTED and f.samefile(other)


def test_fmt_write_says_what_is_missing_instead_of_a_file(tmp_path, capsys):
    missing = tmp_path / "missing.moe"
    _fmt_write_refused([str(missing)], capsys, f"{missing} does not exist")
    assert not missing.exists()
    _fmt_write_refused(["balanced"], capsys, "not a bundled name: balanced is a bundled policy",
                       "moerun policy fmt balanced > balanced.moe")
    _fmt_write_refused([UNFORMATTED], capsys, "this is policy text")


def test_fmt_write_of_a_file_already_canonical_writes_nothing_even_read_only(tmp_path, capsys):
    f = tmp_path / "done.moe"
    f.write_text(UNFORMATTED)
    assert main(["policy", "fmt", "--write", str(f)]) == 0
    f.chmod(0o444)
    assert main(["policy", "fmt", "--write", str(f)]) == 0  # nothing to write: nothing refused
    assert capsys.readouterr().err == ""
