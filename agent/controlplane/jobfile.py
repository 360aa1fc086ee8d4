"""The job file of ``cloudbender-cp submit``: a small YAML file, validated strictly.

A job file describes one ``job.assign`` (docs/protocol.md §4) in the words of the wire
message, plus where the model comes from: ``model.file``, a local tar or tar.gz that
the server registers as an artifact (§6) with its sha256 and size. Relative paths are
read relative to the job file. See docs/control-plane.md for the format.

:func:`load_job_file` parses and checks it, and never sends anything: every unknown
key, missing key, wrong type or duplicated key is a :class:`JobFileError` whose
``problems`` each name the key (``resources.cpu: unknown key``). After the shapes, the
assignment the file describes is checked against revision 1.1's rules with the same
function the server's ``assign()`` uses (:mod:`agent.controlplane.assigncheck`), so a
file that the server would refuse is refused here, before the server is asked.
"""

from __future__ import annotations

import secrets
import tarfile
import time
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from agent.controlplane.assigncheck import assign_problems
from agent.controlplane.errors import ControlPlaneError
from agent.controlplane.jobs import build_assign

# A job file is a few lines; a bigger one is a mistake, not a job.
MAX_JOB_FILE_BYTES = 1024 * 1024
Positive = Annotated[StrictInt, Field(gt=0)]


class JobFileError(ControlPlaneError):
    """The job file cannot be used. ``problems``: one text per fault, each naming its key."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems


class _Strict(BaseModel):
    # strict: YAML's 1 is not "1" and yes is not a string; extra: a typo is an error,
    # not a limit silently left out.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ImageSection(_Strict):
    ref: Annotated[str, Field(min_length=1)]
    digest: str | None = None


class ModelSection(_Strict):
    file: Annotated[str, Field(min_length=1)]
    artifact: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class GpusSection(_Strict):
    count: Annotated[StrictInt, Field(ge=0)] = 0
    types: list[str] | None = None


class ResourcesSection(_Strict):
    cpus: StrictFloat | StrictInt | None = None
    memory_mib: Positive | None = None


class ResultsSection(_Strict):
    max_bytes: Positive | None = None
    max_files: Positive | None = None


class JobFile(_Strict):
    """One job, as written in the file. ``job_id`` absent: :func:`load_job_file` makes one."""

    job_id: str | None = None
    image: ImageSection
    datastore: Annotated[str, Field(min_length=1)]
    model: ModelSection | None = None
    command: list[str] | None = None
    env: dict[str, str] | None = None
    gpus: GpusSection | None = None
    resources: ResourcesSection | None = None
    timeout_s: Positive | None = None
    results: ResultsSection | None = None

    def assign_fields(self) -> dict[str, Any]:
        """The optional ``job.assign`` fields the file sets (``model`` and ``image`` aside)."""
        fields = self.model_dump(
            exclude={"job_id", "image", "datastore", "model"}, exclude_none=True
        )
        if self.image.digest is not None:
            fields["image"] = {"digest": self.image.digest}
        return fields


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a job file that says ``timeout_s`` twice
    is refused instead, since the reader cannot tell which one was meant."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _problems(exc: ValidationError) -> list[str]:
    out = []
    for error in exc.errors(include_url=False, include_input=False):
        kind, where = error["type"], _where(error["loc"])
        if kind == "extra_forbidden":
            out.append(f"{where}: unknown key")
        elif kind == "missing":
            out.append(f"{where}: required")
        else:
            out.append(f"{where}: {error['msg']}")
    return out


def new_job_id() -> str:
    """A fresh id that follows the protocol's 1.1 pattern: ``job-YYYYmmdd-HHMMSS-xxxxxx``."""
    return time.strftime("job-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def model_path(job: JobFile, job_file: Path) -> Path | None:
    """Where ``model.file`` is, relative paths read relative to ``job_file``; absolute."""
    if job.model is None:
        return None
    return (job_file.parent / job.model.file).absolute()


def load_job_file(path: Path) -> JobFile:
    """Parse and check ``path``; the job, with its ``job_id`` filled in.

    Raises :class:`JobFileError` for an unreadable, malformed or invalid file, a model
    file that is not a readable tar archive, or an assignment that breaks 1.1's rules.
    Reads the file and opens the model's archive; sends nothing.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_JOB_FILE_BYTES + 1)
    except OSError as exc:
        raise JobFileError(path, [f"cannot read: {exc.strerror}"]) from exc
    if len(raw) > MAX_JOB_FILE_BYTES:
        raise JobFileError(path, [f"larger than {MAX_JOB_FILE_BYTES} bytes"])
    try:
        data = yaml.load(raw, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise JobFileError(path, [f"not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise JobFileError(path, ["(top level): must be a mapping of keys"])
    try:
        job = JobFile.model_validate(data)
    except ValidationError as exc:
        raise JobFileError(path, _problems(exc)) from exc
    if job.job_id is None:
        job = job.model_copy(update={"job_id": new_job_id()})
    model = model_path(job, path)
    if model is not None:
        _check_archive(path, model)
    assert job.job_id is not None
    # The model's sha256 and size are the server's to compute; a placeholder of the
    # same shape lets the frame be measured as it will be sent.
    placeholder = {"artifact": "x" * 64, "sha256": "0" * 64, "size": 2**40}
    fields = job.assign_fields() | ({"model": placeholder} if model is not None else {})
    problems = assign_problems(build_assign(job.job_id, job.image.ref, job.datastore, **fields))
    if problems:
        raise JobFileError(path, problems)
    return job


def _check_archive(job_file: Path, model: Path) -> None:
    if not model.is_file():
        raise JobFileError(job_file, [f"model.file: {model} is not a readable file"])
    try:
        is_tar = tarfile.is_tarfile(model)
    except OSError as exc:
        raise JobFileError(job_file, [f"model.file: cannot read {model}: {exc.strerror}"]) from exc
    if not is_tar:
        raise JobFileError(job_file, [f"model.file: {model} is not a tar or tar.gz archive"])
