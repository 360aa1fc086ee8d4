"""A directory an unprivileged program in the review sandbox can reach.

pytest's ``tmp_path`` is root-only, and a checkout may be too (or lie under ``/tmp``,
which the sandbox hides behind a private tmpfs, as it hides ``/var/tmp``, ``/dev/shm``
and ``/run``): a program the sandbox must run is copied to a fresh directory under
``/var/lib``, removed afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def reachable_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cloudbender-review-test.", dir="/var/lib"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
