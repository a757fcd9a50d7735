"""fixtures/debian_root.py's checkout sync and its errors, without building a root.

Why: ``make test-debian13`` runs the suite on the copy ``sync_checkout`` leaves in the root;
a stale file there (or a file where the checkout now has a folder) would test code that is
not the checkout's, and the multi-minute paths that use it would not say so.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fixtures.debian_root import CHECKOUT, RootError, sync_checkout


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def _files(root: Path) -> dict[str, str]:
    """The copy's files (outside its .git), relative path to text."""
    copy = root / CHECKOUT.relative_to("/")
    return {
        str(p.relative_to(copy)): p.read_text()
        for p in sorted(copy.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(copy).parts
    }


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "src"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text(".venv/\nbuild/\n")
    (repo / "a").mkdir()
    (repo / "a" / "x.py").write_text("x\n")
    (repo / "b").write_text("b\n")
    (repo / "gone.py").write_text("old\n")
    _git(repo, "add", ".")
    return repo


def test_sync_copies_tracked_and_untracked_files_and_removes_stale_ones(
    checkout: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    sync_checkout(checkout, root)
    assert _files(root) == {
        ".gitignore": ".venv/\nbuild/\n",
        "a/x.py": "x\n",
        "b": "b\n",
        "gone.py": "old\n",
    }
    # The copy's own ignored state (its venv) survives; a deleted file goes; a new,
    # untracked but not ignored file comes; an ignored one in the checkout does not.
    venv = root / CHECKOUT.relative_to("/") / ".venv" / "marker"
    venv.parent.mkdir()
    venv.write_text("mine\n")
    (checkout / "gone.py").unlink()
    (checkout / "new.py").write_text("new\n")
    (checkout / "build").mkdir()
    (checkout / "build" / "junk").write_text("junk\n")
    (checkout / "b").write_text("b changed\n")
    os.utime(checkout / "b", (1, 1))  # a different mtime, whatever the clock did
    sync_checkout(checkout, root)
    files = _files(root)
    assert files.pop(".venv/marker") == "mine\n"
    assert files == {
        ".gitignore": ".venv/\nbuild/\n",
        "a/x.py": "x\n",
        "b": "b changed\n",
        "new.py": "new\n",
    }


def test_sync_follows_a_file_that_became_a_folder_and_back(checkout: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    sync_checkout(checkout, root)
    (checkout / "a" / "x.py").unlink()
    (checkout / "a").rmdir()
    (checkout / "a").write_text("now a file\n")
    (checkout / "b").unlink()
    (checkout / "b").mkdir()
    (checkout / "b" / "y.py").write_text("y\n")
    sync_checkout(checkout, root)
    files = _files(root)
    assert files["a"] == "now a file\n" and files["b/y.py"] == "y\n"
    assert "a/x.py" not in files and "a/a" not in files and "b" not in files


def test_a_checkout_git_refuses_is_one_clear_error(tmp_path: Path) -> None:
    not_a_repo = tmp_path / "plain"
    not_a_repo.mkdir()
    with pytest.raises(RootError) as info:
        sync_checkout(not_a_repo, tmp_path / "root")
    assert "git -C" in str(info.value) and "not a git repository" in str(info.value)
