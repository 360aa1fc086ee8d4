"""remove_tree: deletes what a peer shaped, however deep, never through a link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.fsutil import discard_tree, remove_tree


def test_links_are_removed_never_followed(tmp_path: Path) -> None:
    """Attack: a link inside a tree to be deleted (or in its place) must not take the
    deletion outside the tree, to the link's target."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep.txt").write_text("keep")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "file").write_text("x")
    (tree / "a" / "to-dir").symlink_to(outside)
    (tree / "a" / "b" / "to-file").symlink_to(outside / "sub" / "keep.txt")
    (tree / "dangling").symlink_to(tmp_path / "nowhere")
    top_link = tmp_path / "link-to-outside"
    top_link.symlink_to(outside, target_is_directory=True)

    remove_tree(tree)
    remove_tree(top_link)

    assert not tree.exists() and not top_link.is_symlink()
    assert (outside / "sub" / "keep.txt").read_text() == "keep"


def test_deeper_than_path_max_and_the_recursion_limit(tmp_path: Path) -> None:
    """Attack: a tree 2,000 levels deep (its path some 6 KB) defeats shutil.rmtree in
    Python 3.11 (RecursionError) and anything that joins names into one path."""
    (tmp_path / "deep").mkdir()
    fd = os.open(tmp_path / "deep", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(2000):
            os.mkdir("dd", dir_fd=fd)
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
            fd, parent = os.open("dd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(parent)
    finally:
        os.close(fd)
    remove_tree(tmp_path / "deep")
    assert list(tmp_path.iterdir()) == []


def test_wide_trees_files_and_missing_paths(tmp_path: Path) -> None:
    wide = tmp_path / "wide"
    for i in range(300):
        (wide / f"d{i}" / "x").mkdir(parents=True)
        (wide / f"d{i}" / "x" / "f").write_bytes(b"")
    remove_tree(f"{wide}/")  # a trailing slash names the same directory
    (tmp_path / "file").write_bytes(b"x")
    remove_tree(tmp_path / "file")
    remove_tree(tmp_path / "missing")  # idempotent: nothing there is fine
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", ["/", ".", "..", "some/dir/.."])
def test_paths_that_do_not_name_one_entry_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="refusing"):
        remove_tree(path)


def test_discard_tree_logs_instead_of_raising(tmp_path: Path) -> None:
    with capture_logs() as logs:
        assert discard_tree(tmp_path / "not-a-dir" / "x", event="cleanup_failed") is True
        (tmp_path / "f").write_bytes(b"")
        # A parent that is a file: ENOTDIR, the kind of failure a caller must survive.
        assert discard_tree(tmp_path / "f" / "x", event="cleanup_failed") is False
    assert [(e["event"], e["log_level"]) for e in logs] == [("cleanup_failed", "warning")]
