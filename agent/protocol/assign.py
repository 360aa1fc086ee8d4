"""``job.assign`` (docs/protocol.md §4, revision 1.1) as strict pydantic models, and the
shared pieces of every incoming message (the strict base, job ids, numbers). Pure.

Revision 1.1's rules live here: the job id pattern, a minimum ``resources.cpus``, size
caps on ``command``, ``env`` and ``gpus.types`` (the frame's own cap is checked by
:func:`agent.protocol.messages.parse_text`, which knows the frame), and an
``image.ref`` that is an image reference (:mod:`agent.protocol.imageref`). They bound
what a control plane can make the agent hold in memory, write to its job store and
print. A refusal names the field and the limit, never the value.
:mod:`agent.protocol.messages` re-exports every name here.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, field_validator
from pydantic_core import PydanticCustomError

from agent.protocol.imageref import GRAMMAR, is_image_ref

# docs/protocol.md 1.1 §4: a letter or digit first, so "." and ".." are never job ids.
_JOB_ID_BODY = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
JOB_ID_PATTERN = rf"^{_JOB_ID_BODY}$"
# The same rule, for deciding whether an invalid job.assign's id is usable (fullmatch).
_JOB_ID = re.compile(_JOB_ID_BODY)
# Ids of jobs the agent accepted under 1.0, which allowed "_", "-" and "." first: a
# control plane must still be able to ack, cancel and collect such a job after an
# upgrade, or it would stay in hello.jobs (and hold a slot of the ack backlog) forever.
# New jobs (job.assign) get the 1.1 rule only.
KNOWN_JOB_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
SHA256_HEX = r"^[0-9a-f]{64}$"

# docs/protocol.md 1.1 §4: the caps on a job.assign, each refused bad_spec. "In all" is the
# sum of the UTF-8 bytes of the strings: each command item; each env name and value.
# They bound what one assignment costs the agent in memory and in the job store.
MAX_ASSIGN_FRAME = 256 * 1024  # bytes of the text frame, as UTF-8
MAX_COMMAND_ITEMS = 256
MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV_ENTRIES = 256
MAX_ENV_BYTES = 64 * 1024
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_GPU_TYPES = 16
MAX_GPU_TYPE_CHARS = 256
# Below this some engines read the limit as none at all (Docker: NanoCpus 0).
MIN_CPUS = 0.01

JobId = Annotated[str, Field(pattern=JOB_ID_PATTERN)]
KnownJobId = Annotated[str, Field(pattern=KNOWN_JOB_ID_PATTERN)]
# Strict floats accept JSON integers but refuse strings and booleans.
Number = float
NonNegative = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(gt=0)]


class StrictMessage(BaseModel):
    """The base of every incoming message: strict types, unknown fields ignored (§2)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


def _utf8_bytes(text: str) -> int:
    # surrogatepass: a lone surrogate counts, rather than raising here.
    return len(text.encode("utf-8", "surrogatepass"))


def _check_image_ref(ref: str) -> str:
    if not is_image_ref(ref):
        # The grammar, never the value: a ref may carry escapes meant for a terminal.
        raise PydanticCustomError(
            "image_ref", "is not an image reference ({grammar})", {"grammar": GRAMMAR}
        )
    return ref


class ImageAuth(StrictMessage):
    username: str
    password: str = Field(repr=False)


class ImageSpec(StrictMessage):
    ref: Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_check_image_ref)]
    digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None
    auth: ImageAuth | None = Field(default=None, repr=False)


class ModelSpec(StrictMessage):
    artifact: Annotated[str, Field(min_length=1, max_length=256)]
    sha256: Annotated[str, Field(pattern=SHA256_HEX)]
    size: NonNegative | None = None


GpuType = Annotated[str, Field(max_length=MAX_GPU_TYPE_CHARS)]


class GpuRequest(StrictMessage):
    count: NonNegative = 0
    types: Annotated[list[GpuType], Field(max_length=MAX_GPU_TYPES)] | None = None


class Resources(StrictMessage):
    cpus: Annotated[Number, Field(ge=MIN_CPUS)] | None = None
    memory_mib: Positive | None = None


class ResultLimits(StrictMessage):
    max_bytes: Positive | None = None
    max_files: Positive | None = None


class JobAssign(StrictMessage):
    """A ``job.assign`` within docs/protocol.md 1.1's caps (the frame's own size is checked
    by :func:`parse_text`). Admission decides the rest (:mod:`agent.jobs.admission`)."""

    type: Literal["job.assign"]
    job_id: JobId
    image: ImageSpec
    datastore: Annotated[str, Field(min_length=1, max_length=64)]
    model: ModelSpec | None = None
    command: Annotated[list[str], Field(max_length=MAX_COMMAND_ITEMS)] | None = None
    env: Annotated[dict[str, str], Field(max_length=MAX_ENV_ENTRIES)] | None = None
    gpus: GpuRequest | None = None
    resources: Resources | None = None
    timeout_s: Positive | None = None
    results: ResultLimits | None = None

    @field_validator("command")
    @classmethod
    def _command_size(cls, command: list[str] | None) -> list[str] | None:
        if command is not None and sum(map(_utf8_bytes, command)) > MAX_COMMAND_BYTES:
            raise PydanticCustomError(
                "too_large", "must hold at most {limit} bytes in all", {"limit": MAX_COMMAND_BYTES}
            )
        return command

    @field_validator("env")
    @classmethod
    def _env_rules(cls, env: dict[str, str] | None) -> dict[str, str] | None:
        if env is None:
            return None
        if not all(ENV_NAME.fullmatch(name) for name in env):
            raise PydanticCustomError(
                "env_name", "names must match {pattern}", {"pattern": ENV_NAME.pattern}
            )
        if any("\0" in value for value in env.values()):
            raise PydanticCustomError("env_nul", "values must not contain NUL", {})
        if sum(_utf8_bytes(k) + _utf8_bytes(v) for k, v in env.items()) > MAX_ENV_BYTES:
            raise PydanticCustomError(
                "too_large", "must hold at most {limit} bytes in all", {"limit": MAX_ENV_BYTES}
            )
        return env
