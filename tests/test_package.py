"""The installed package: native extension present, bundled data reachable, README paths true."""
import importlib.resources
import pathlib
import re
import subprocess
import sys

import moerun
from moerun import native

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_native_extension_reports_its_build():
    info = native.build_info()
    assert isinstance(info["cuda"], bool)
    assert info["torch_version"]


def test_one_version_string():
    assert re.fullmatch(r"\d+\.\d+\.\d+", moerun.__version__)
    text = (REPO / "pyproject.toml").read_text()
    assert 'version = { attr = "moerun.__version__" }' in text


def test_kernels_and_policies_are_installed_as_subpackages():
    import moerun.kernels  # noqa: F401

    names = {p.name for p in importlib.resources.files("moerun.policies").iterdir()}
    repo_names = {p.name for p in (REPO / "policies").glob("*.moe")}
    assert repo_names <= names


def test_readme_links_point_to_existing_files():
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if target.startswith("http"):
            continue
        assert (REPO / target).exists(), f"README links to missing {target}"


def _from_repo_root(code: str) -> subprocess.CompletedProcess:
    """``python -c CODE`` run from the repository root, as the README's commands are (the root is then
    first on sys.path, as with ``python -m``)."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_nothing_named_kernels_resolves_to_the_repository_folder_from_the_root():
    done = _from_repo_root(
        "import importlib.util, pathlib, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "where = [] if spec is None else list(spec.submodule_search_locations or []) + [spec.origin or '']\n"
        "bad = [w for w in where if w and pathlib.Path(w).resolve().is_relative_to(pathlib.Path('kernels').resolve())]\n"
        "sys.exit(f'kernels resolves to {bad}' if bad else 0)\n")
    assert done.returncode == 0, done.stderr + done.stdout
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_the_native_extension_and_kernels_import_from_the_root():
    done = _from_repo_root("import moerun._C, moerun.kernels.fused_moe, moerun.bench.cli; import transformers.integrations.hub_kernels")
    assert done.returncode == 0, done.stderr


def test_readme_commands_are_the_ones_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for marker in ("test-command", "bench-command"):
        block = re.search(rf"<!-- {marker}[^>]*-->\s*```bash\n(.+)\n```", readme)
        assert block, f"README has no {marker} block"
        assert marker in ci, f".ci/run does not run the README's {marker}"
    assert "python -m moerun.bench" in re.search(r"<!-- bench-command[^>]*-->\s*```bash\n(.+)\n```", readme).group(1)
