"""Admission policy: is this ``job.assign`` acceptable on this node, and with what limits?

Pure: no I/O, no asyncio, no clock. :func:`admit` takes an already validated
:class:`~agent.protocol.messages.JobAssign`, the current :class:`~agent.config.Config`
and facts about the node, and returns either :class:`Admitted` (everything the job
manager needs to run the job, with every limit made concrete) or :class:`Rejected`
(a code of docs/protocol.md §4 and a detail for the control plane).

Decided here, in this order (the first failing check wins; one check may name several
problems of its kind): ``bad_spec``, ``unknown_datastore``, ``image_not_allowed``,
``gpu_type_unavailable``, ``limits_exceeded``.

Decided by :func:`node_refusal`, after :func:`admit`, from facts the job manager gives
it: ``no_capacity`` (every slot held, or too many ended jobs waiting for ``job.ack``) and
``no_space`` (the state directory under ``limits.min_free_mib``), and before both
``runtime_unavailable`` (the container engine does not answer). Not decided here:
``draining`` and ``duplicate_job``, which depend on the manager's lifecycle and store.

A ``Rejected.detail`` goes off-site. It never contains a host path (a datastore's path,
the state directory) or credentials; it names config keys, datastore *names*, image
patterns, GPU names and numbers. Of the values the control plane sent, only the
datastore name (at most 64 characters) and the names of refused ``env`` variables are
quoted (an invalid name with ``repr``, so control characters are escaped, and
``job_rejected`` clips the detail): a hostile peer cannot make the agent reflect arbitrary text.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.config.models import Config, DatastoreConfig, LimitsConfig
from agent.gpu.base import GpuInfo, GpuInventory
from agent.protocol.messages import MIN_CPUS, ImageAuth, JobAssign, ModelSpec
from agent.runtime.spec import env_problems

NO_GPU_SUPPORT = "this node's container engine cannot give GPUs to containers"


@dataclass(frozen=True)
class Admitted:
    """An assignment this node accepts, with every limit resolved to a number.

    ``gpu_types`` is ``None`` when any GPU will do (the assignment gave no types or an
    empty list). ``image_auth`` is for one pull only: never store or log it (it is left
    out of ``repr``). ``env`` is read-only and holds the assignment's variables only;
    the runtime adds the ones the agent sets.
    """

    job_id: str
    image_ref: str
    image_digest: str | None
    image_auth: ImageAuth | None = field(repr=False)
    datastore: DatastoreConfig
    command: tuple[str, ...] | None
    env: Mapping[str, str]
    model: ModelSpec | None
    cpus: float
    memory_mib: int
    pids: int
    tmp_mib: int
    timeout_s: int
    gpu_count: int
    gpu_types: tuple[str, ...] | None
    max_result_bytes: int
    max_result_files: int
    shm_mib: int = 64


@dataclass(frozen=True)
class Rejected:
    """``code`` is one of :data:`agent.jobs.model.REJECTION_CODES`; ``detail`` is safe
    to send to the control plane (no host path, no credentials)."""

    code: str
    detail: str


def gpu_type_matches(gpu: GpuInfo, types: tuple[str, ...] | None) -> bool:
    """Whether ``gpu`` is of an acceptable type: any GPU when ``types`` is ``None`` or
    empty, else one whose NVML name equals one of ``types`` exactly (as NVML prints
    it, e.g. ``"NVIDIA H100 80GB HBM3"``). A GPU whose name NVML would not give matches
    only "any"."""
    if not types:
        return True
    return gpu.name is not None and gpu.name in types


def leasable(gpu: GpuInfo, types: tuple[str, ...] | None) -> bool:
    """Whether ``gpu`` may ever be leased to a job asking for ``types``: allocatable
    (offered by ``gpus.allow`` and healthy), of a matching type, and with a UUID (GPUs
    are leased and handed to containers by UUID). Admission and
    :class:`agent.jobs.gpus.GpuLeases` share this predicate, so that an admitted job
    never waits for GPUs the leases would never give it."""
    return gpu.allocatable and gpu.uuid is not None and gpu_type_matches(gpu, types)


def _bad_spec(assign: JobAssign) -> list[str]:
    problems = env_problems(assign.env or {})
    if assign.command is not None:
        if not assign.command:
            problems.append("command: must not be an empty list (leave it out to use the image's)")
        elif any("\0" in arg for arg in assign.command):
            problems.append("command: arguments must not contain NUL bytes")
    # The protocol model refuses this already; an assignment built in code is held to
    # it too, since a CPU limit that rounds to 0 is no limit at all to Docker.
    cpus = assign.resources.cpus if assign.resources is not None else None
    if cpus is not None and not cpus >= MIN_CPUS:
        problems.append(f"resources.cpus: must be at least {MIN_CPUS:g}")
    return problems


def _image_problem(assign: JobAssign, config: Config) -> str | None:
    patterns = config.runtime.allowed_images
    if not patterns:
        return "this node allows no images (its runtime.allowed_images is empty)"
    # The ref is matched as written, without registry or tag normalisation: "ubuntu"
    # does not match "docker.io/library/*". Failing closed is the point.
    if not any(fnmatch.fnmatchcase(assign.image.ref, p) for p in patterns):
        return f"image.ref matches none of runtime.allowed_images: {', '.join(patterns)}"
    if config.runtime.require_digest and assign.image.digest is None:
        return "this node requires image.digest (runtime.require_digest is true)"
    return None


def _gpu_problem(
    count: int, types: tuple[str, ...] | None, gpus: GpuInventory | None, gpu_support: bool
) -> str | None:
    if count == 0:
        return None
    if not gpu_support:
        return NO_GPU_SUPPORT
    known = gpus.gpus if gpus is not None else ()
    # All allocatable GPUs count, busy ones too: a busy GPU makes the job wait.
    usable = [g for g in known if leasable(g, types)]
    if len(usable) >= count:
        return None
    what = "GPU(s)" if types is None else "GPU(s) of the requested type(s)"
    detail = f"the job asks for {count} {what}; this node has {len(usable)} allocatable"
    offered = sorted({g.name for g in known if leasable(g, None) and g.name is not None})
    if types is not None and offered:
        detail += f" (its allocatable GPU types: {', '.join(offered)})"
    return detail


def _limit_problems(
    assign: JobAssign, config: Config, cpu_cap: float
) -> tuple[list[str], float, int, int]:
    limits = config.limits
    resources = assign.resources
    cpus = resources.cpus if resources is not None else None
    memory = resources.memory_mib if resources is not None else None
    problems = []
    if cpus is not None and cpus > cpu_cap:
        problems.append(f"resources.cpus {cpus:g} is more than this node allows ({cpu_cap:g})")
    if memory is not None and memory > limits.max_memory_mib:
        problems.append(
            f"resources.memory_mib {memory} is more than this node allows ({limits.max_memory_mib})"
        )
    if assign.timeout_s is not None and assign.timeout_s > limits.max_timeout_s:
        problems.append(
            f"timeout_s {assign.timeout_s} is more than this node allows ({limits.max_timeout_s})"
        )
    return (
        problems,
        cpus if cpus is not None else cpu_cap,
        memory if memory is not None else limits.max_memory_mib,
        assign.timeout_s if assign.timeout_s is not None else limits.max_timeout_s,
    )


def _capped(asked: int | None, cap: int) -> int:
    return cap if asked is None else min(asked, cap)


def admit(
    assign: JobAssign,
    config: Config,
    *,
    node_cpus: int,
    gpus: GpuInventory | None,
    gpu_support: bool,
) -> Admitted | Rejected:
    """Decide whether this node accepts ``assign``; see the module docstring.

    ``node_cpus`` is the node's logical CPU count (at least 1, else ``ValueError``):
    no job gets more CPUs than that, whatever ``limits.max_cpus`` says. ``gpus`` is the
    inventory already passed through :func:`agent.gpu.base.mark_allocatable` (``None``
    when there is none); ``gpu_support`` is whether the container engine can give GPUs
    to containers (the NVIDIA runtime is installed).

    Limits left out of the assignment take the config's caps (CPUs: the smaller of
    ``limits.max_cpus`` and ``node_cpus``). Resources and a timeout above the caps are
    rejected (``limits_exceeded``): the job would not run as the provider asked. Result
    limits differ: the effective value is the smaller of the assignment's and the
    config's, so a larger ``results.max_bytes``/``max_files`` is capped, not rejected;
    the assignment can only tighten them (docs/protocol.md §4), and a job whose output fits
    loses nothing by it.

    Pure and deterministic; raises nothing else.
    """
    if node_cpus < 1:
        raise ValueError(f"node_cpus must be at least 1, not {node_cpus}")

    problems = _bad_spec(assign)
    if problems:
        return Rejected("bad_spec", "; ".join(problems))

    datastore = next((d for d in config.datastores if d.name == assign.datastore), None)
    if datastore is None:
        names = ", ".join(d.name for d in config.datastores) or "none"
        return Rejected(
            "unknown_datastore",
            f"this node has no datastore named {assign.datastore!r} (it offers: {names})",
        )

    image_problem = _image_problem(assign, config)
    if image_problem is not None:
        return Rejected("image_not_allowed", image_problem)

    request = assign.gpus
    gpu_count = request.count if request is not None else 0
    gpu_types = tuple(request.types) if request is not None and request.types else None
    gpu_problem = _gpu_problem(gpu_count, gpu_types, gpus, gpu_support)
    if gpu_problem is not None:
        return Rejected("gpu_type_unavailable", gpu_problem)

    cpu_cap = float(min(config.limits.max_cpus, node_cpus))
    problems, cpus, memory_mib, timeout_s = _limit_problems(assign, config, cpu_cap)
    if problems:
        return Rejected("limits_exceeded", "; ".join(problems))
    if not cpus >= MIN_CPUS:  # the config's own cap, were it built without validation
        return Rejected("limits_exceeded", f"limits.max_cpus is below {MIN_CPUS:g}")

    results = assign.results
    return Admitted(
        job_id=assign.job_id,
        image_ref=assign.image.ref,
        image_digest=assign.image.digest,
        image_auth=assign.image.auth,
        datastore=datastore,
        command=tuple(assign.command) if assign.command is not None else None,
        env=MappingProxyType(dict(assign.env or {})),
        model=assign.model,
        cpus=float(cpus),
        memory_mib=memory_mib,
        pids=config.limits.pids,
        tmp_mib=config.limits.tmp_mib,
        shm_mib=config.limits.shm_mib,
        timeout_s=timeout_s,
        gpu_count=gpu_count,
        gpu_types=gpu_types,
        max_result_bytes=_capped(results.max_bytes if results else None, config.results.max_bytes),
        max_result_files=_capped(results.max_files if results else None, config.results.max_files),
    )


# Ended jobs that may wait for their job.ack, per job slot, before new jobs are refused
# no_capacity. Each is held in memory and in the store (and listed in every hello)
# until acknowledged; without a bound a control plane that never acks grows both
# without end. A CP that acks as it records ends never comes near it.
ACK_BACKLOG_PER_SLOT = 4


def node_refusal(
    limits: LimitsConfig,
    *,
    active: int,
    ended_unacked: int,
    free_mib: int | None,
    engine_up: bool = True,
) -> Rejected | None:
    """The refusals that depend on the node's state rather than the assignment, checked
    after :func:`admit`, in this order: ``runtime_unavailable`` while the container engine
    does not answer (agent.runtime.watch); ``no_capacity`` when every slot is held, or when
    ``ACK_BACKLOG_PER_SLOT`` times the slots ended jobs wait for their ``job.ack``; ``no_space``
    when the state directory has less than ``limits.min_free_mib`` free (``free_mib``
    None: unknown, not refused here). Pure."""
    if not engine_up:  # no host path here: the socket is named in /healthz, not off-site
        return Rejected("runtime_unavailable", "the node's container engine does not answer")
    slots = limits.max_concurrent_jobs
    if active >= slots:
        return Rejected("no_capacity", f"all {slots} job slots are busy")
    backlog = ACK_BACKLOG_PER_SLOT * slots
    if ended_unacked >= backlog:
        return Rejected(
            "no_capacity", f"{ended_unacked} ended jobs wait for job.ack (at most {backlog})"
        )
    if free_mib is not None and free_mib < limits.min_free_mib:
        return Rejected(
            "no_space",
            f"{free_mib} MiB free on the node, under its floor of {limits.min_free_mib} "
            "(limits.min_free_mib)",
        )
    return None
