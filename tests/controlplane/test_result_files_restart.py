"""The reference CP's result files across a restart at the worst moment of publishing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent.controlplane.manifest import Manifest, ResultFile
from agent.controlplane.resultfiles import JobFiles


def test_a_restart_between_publishing_and_the_marker_receives_the_files_again(
    tmp_path: Path,
) -> None:
    """finish() renames the finished tree into place, then moves the marker. A CP that
    stopped between the two found a partial manifest without its tree, and every write
    of the upload resumed there failed (ENOENT): the job's results were never accepted."""
    manifest = Manifest("j-1", (ResultFile(0, "a.csv", 3, hashlib.sha256(b"abc").hexdigest()),))
    files = JobFiles(tmp_path, "node", "j-1")
    files.begin(manifest)
    files.write(0, 0, b"abc")
    files.complete(0)
    files.durable()
    files.final_dir.parent.mkdir(parents=True)
    os.rename(files.tree, files.final_dir)  # finish()'s first step, and then the stop

    again = JobFiles(tmp_path, "node", "j-1")
    assert again.accepted_files(manifest) is None
    assert again.held(manifest) == [0]
    again.write(0, 0, b"abc")
    again.complete(0)
    final = again.finish(manifest)
    assert (final / "a.csv").read_bytes() == b"abc"
    assert JobFiles(tmp_path, "node", "j-1").accepted_files(manifest) == final
