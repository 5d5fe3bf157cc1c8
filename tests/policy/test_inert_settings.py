"""Settings moerun accepts from MoE-PolicyLang files but does not act on say so, and explain claims nothing."""
from moerun.cli import main
from moerun.policy import compile_policy
from moerun.policy.explain import explain

POLICY = """policy p {
    cache { capacity = 4 }
    schedule { overlap = false }
    monitor { metrics = [hit_rate] window = 50 log_interval = 10 }
}
"""


def test_check_notes_each_inert_setting(tmp_path, capsys):
    path = tmp_path / "p.moe"
    path.write_text(POLICY)
    assert main(["policy", "check", str(path)]) == 0
    out = capsys.readouterr().out
    for where, key in (("3:16", "schedule.overlap"), ("4:15", "monitor.metrics"), ("4:48", "monitor.log_interval")):
        assert f"{path}:{where}: note: {key} is accepted for compatibility and has no effect" in out
    assert "monitor.window" not in out  # it acts: the default window of adapt rules


def test_explain_does_not_claim_overlap_or_logging():
    text = explain(compile_policy(POLICY))
    assert "do not overlap" not in text and "logged every" not in text
    assert "no log lines are written" in text and "over 50 accesses" in text
