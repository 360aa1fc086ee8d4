"""The agent on Debian 12's own Python (3.11.2), which lacks tarfile's extraction filters.

These run on any Python: they take ``tarfile.data_filter`` and ``tarfile.FilterError``
away, as 3.11.2 has neither (both arrived in 3.11.4). The suite as a whole runs on 3.11.2
when ``.venv`` is built with ``/usr/bin/python3`` (scripts/bootstrap.sh's default).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from agent.errors import ModelArchiveUnsafe
from agent.models.unpack import unpack
from tests.unit.test_model_unpack import CAP, UNSAFE, _model_members, archive


@pytest.fixture
def python_3112(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    monkeypatch.delattr(tarfile, "FilterError", raising=False)


@pytest.mark.usefixtures("python_3112")
def test_a_model_unpacks_on_a_python_without_tarfile_filters(tmp_path: Path) -> None:
    """Debian 12's python3 (3.11.2): every model job ended failed / agent_error with
    ``AttributeError: module 'tarfile' has no attribute 'data_filter'``."""
    dest = tmp_path / "out"
    unpack(archive(tmp_path / "m.tar.gz", _model_members(), gz=True), dest, max_bytes=CAP)
    assert (dest / "config.json").read_bytes() == b'{"k": 1}'
    assert (dest / "deep" / "er" / "predict.py").read_text() == "print('hi')\n"


@pytest.mark.usefixtures("python_3112")
@pytest.mark.parametrize("name", sorted(UNSAFE))
def test_without_tarfile_filters_unsafe_archives_are_still_refused(
    tmp_path: Path, name: str
) -> None:
    """A hostile model archive (links, devices, absolute paths, '..', clashing members)
    on a Python whose tarfile has no data_filter: the agent's own checks must refuse it
    alone, leaving nothing behind."""
    src = archive(tmp_path / "bad.tar", UNSAFE[name])
    dest = tmp_path / "out"
    with pytest.raises(ModelArchiveUnsafe):
        unpack(src, dest, max_bytes=CAP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]
