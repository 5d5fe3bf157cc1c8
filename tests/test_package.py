"""The installed package: native extension present, bundled data reachable, README paths true."""
import importlib.resources
import pathlib
import re

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
