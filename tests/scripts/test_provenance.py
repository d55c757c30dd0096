"""scripts/provenance.py: benchmark JSON names the commit its code came from, from git or from RINGFLASH_COMMIT."""

import shutil
import subprocess

import pytest
from helpers import ROOT

from scripts import provenance


def test_a_checkout_names_its_head_and_marks_edited_tracked_files(monkeypatch):
    monkeypatch.delenv("RINGFLASH_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True) if shutil.which("git") else None
    if head is None or head.returncode != 0:
        pytest.skip("not a git checkout, or no git")
    sha = head.stdout.strip()
    assert provenance.source_commit() in (sha, sha + "+changes")
    monkeypatch.setenv("RINGFLASH_COMMIT", "abc1234")  # a copy of the tree names its commit, whatever .git says
    assert provenance.source_commit() == "abc1234"


def test_a_tree_without_git_takes_the_environment_or_none(monkeypatch, tmp_path):
    monkeypatch.setattr(provenance, "ROOT", tmp_path)  # no .git in a temp dir, nor above it
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setenv("RINGFLASH_COMMIT", "abc1234")
    assert provenance.source_commit() == "abc1234"
    monkeypatch.delenv("RINGFLASH_COMMIT")
    assert provenance.source_commit() is None


def test_another_checkout_names_its_own_head_and_never_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setenv("RINGFLASH_COMMIT", "abc1234")
    assert provenance.source_commit(tmp_path) is None  # not a checkout: the variable speaks for this tree only
    if shutil.which("git") is None:
        pytest.skip("no git")
    git = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True,  # noqa: E731
                                       check=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "f")
    assert provenance.source_commit(tmp_path) == git("rev-parse", "--short", "HEAD")
    (tmp_path / "f.txt").write_text("b")
    assert provenance.source_commit(tmp_path).endswith("+changes")


def test_a_folder_inside_another_checkout_names_nothing(monkeypatch, tmp_path):
    """--against DIR with a package copied into a folder of this checkout: git would answer with this checkout's
    HEAD, which is not the copy's."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "copy").mkdir()
    assert provenance.source_commit(tmp_path / "copy") is None
