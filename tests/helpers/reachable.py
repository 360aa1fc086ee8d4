"""Directories other users can reach (mode 0755), removed afterwards.

pytest's ``tmp_path`` is root-only (0700), which hides what is in it from any other
uid. :func:`shared_dir` makes a fresh 0755 directory; :func:`reachable_dir` makes one
under ``/var/lib`` for programs the review sandbox must run, since the sandbox hides
``/tmp`` (and a checkout there) behind a private tmpfs, as it hides ``/var/tmp``,
``/dev/shm`` and ``/run``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def shared_dir(prefix: str, parent: str = "/tmp") -> Iterator[Path]:
    """A fresh directory under ``parent`` that every user may enter."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def reachable_dir() -> contextlib.AbstractContextManager[Path]:
    """A directory the review sandbox's program can reach (module doc)."""
    return shared_dir("cloudbender-review-test.", "/var/lib")
