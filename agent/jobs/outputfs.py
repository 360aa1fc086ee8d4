"""Each job's ``/opt/output`` on a file system of its own, capped at the job's result size.

A bind mount of a plain directory lets a job fill the node's disk whatever its result cap
(a review wrote 2 GiB with a 1 MiB cap). Here every job gets a sparse ext4 image in its
job directory, loop-mounted where the container's ``/opt/output`` is bound::

    <jobs_dir>/<job_id>/            0700 root
    <jobs_dir>/<job_id>/output.img  0600 root   sparse; what the job writes lands here
    <jobs_dir>/<job_id>/output/              the image's mount point, root dir owned by
                                             the job's user, mode 0700

The image's size is the cap: the job's ``results.max_bytes`` plus :func:`headroom`, so a
job that writes without end gets ``ENOSPC`` and the node loses at most that much disk.
The image is sparse, so a job that writes little costs little. No journal (an output is
written once and copied into the spool before anything relies on it), no reserved
blocks, inodes for twice ``max_files`` (files and directories), and mount options
``nosuid,nodev,noexec``.

Mounting needs the host's mount namespace, where dockerd sees it:

- :class:`DirectMounter` runs ``mount``/``umount`` (root with ``CAP_SYS_ADMIN`` in the
  host's namespace: a shell, a test, a container with host privileges);
- :class:`SystemdMounter` asks systemd (``systemd-mount``/``systemd-umount``, PID 1 does
  the mount), for the hardened unit, whose private mount namespace and bounding set
  rule out mounting from the agent itself.

:func:`default_mounter` picks one from the facts (is this host booted with systemd, and
is this process outside PID 1's mount namespace?). Every operation here is blocking: call
it from a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from agent.errors import AgentError
from agent.fsutil import remove_tree
from agent.paths import child

log = structlog.get_logger(__name__)

MIB = 1024 * 1024
BLOCK = 4096
INODE_BYTES = 256
MIN_IMAGE = 2 * MIB
IMAGE_NAME = "output.img"
MOUNT_NAME = "output"
MOUNT_OPTIONS = "nosuid,nodev,noexec,noatime"
# An output with less than this free has hit its cap: ext4 keeps a few blocks out of
# reach of large writes (tens of KiB when filled with 1 MiB writes), and the headroom's
# fixed 2 MiB means that output within the cap never comes this close.
FULL_BELOW = MIB
_TOOL_TIMEOUT_S = 60.0


class OutputFsError(AgentError):
    """A job's output file system cannot be made, mounted or removed."""

    reason = "agent_error"


def headroom(max_bytes: int, max_files: int) -> int:
    """Bytes the image holds beyond ``max_bytes``: what the node may lose beyond the cap.

    Each file and directory can waste up to one 4 KiB block to rounding, each needs an
    inode (256 bytes, twice ``max_files`` of them), and ext4 keeps bitmaps and group
    descriptors (under 1 %; 1/64 and 2 MiB are kept for them). For the defaults (1 GiB,
    10,000 files) that is 105 MiB, about 10 %; for 100 MiB and 1,000 files, 12 MiB.
    """
    files = 2 * max_files + 16
    return files * BLOCK + files * INODE_BYTES + max_bytes // 64 + 2 * MIB


def image_size(max_bytes: int, max_files: int) -> int:
    size = max_bytes + headroom(max_bytes, max_files)
    return max(MIN_IMAGE, -(-size // BLOCK) * BLOCK)


class Mounter(Protocol):
    """Mounts an ext4 image and unmounts it, in the host's mount namespace."""

    def mount(self, image: Path, target: Path) -> None:
        """Mount ``image`` (a regular file) at ``target`` (an existing directory).
        Raises :class:`OutputFsError`."""

    def unmount(self, target: Path) -> None:
        """Unmount ``target``; detach it lazily if busy. Raises :class:`OutputFsError`."""


def _run(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_TOOL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OutputFsError(f"{what}: {argv[0]} did not run: {exc}") from exc
    if done.returncode != 0:
        words = " ".join((done.stderr or done.stdout).split())[:300]
        raise OutputFsError(f"{what}: {argv[0]} exited {done.returncode}: {words}")


class DirectMounter:
    def mount(self, image: Path, target: Path) -> None:
        _run(
            ["mount", "-t", "ext4", "-o", f"loop,{MOUNT_OPTIONS}", str(image), str(target)],
            "mounting a job's output",
        )

    def unmount(self, target: Path) -> None:
        try:
            _run(["umount", str(target)], "unmounting a job's output")
        except OutputFsError:
            _run(["umount", "--lazy", str(target)], "unmounting a job's output")


class SystemdMounter:
    def mount(self, image: Path, target: Path) -> None:
        # systemd-mount sets up the loop device itself for a regular file, and PID 1
        # mounts it in the host's namespace, from where it propagates into ours. The
        # mount is a job of PID 1's queue: without --no-block (which only a udev rule
        # needs) the command returns once that job is done, so the check below sees it.
        _run(
            [
                "systemd-mount",
                "--collect",
                "--type=ext4",
                f"--options={MOUNT_OPTIONS}",
                str(image),
                str(target),
            ],
            "mounting a job's output",
        )
        if not os.path.ismount(target):
            raise OutputFsError("mounting a job's output: systemd-mount left it unmounted")

    def unmount(self, target: Path) -> None:
        _run(["systemd-umount", str(target)], "unmounting a job's output")


def default_mounter() -> Mounter:
    """:class:`SystemdMounter` on a host booted with systemd when this process is not in
    PID 1's mount namespace (a sandboxed unit); :class:`DirectMounter` otherwise."""
    if not os.path.isdir("/run/systemd/system"):  # sd_booted(3)
        return DirectMounter()
    try:
        ours = os.stat("/proc/self/ns/mnt").st_ino
        init = os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        return SystemdMounter()  # PID 1 hidden from us: a sandboxed unit
    return DirectMounter() if ours == init else SystemdMounter()


@dataclass(frozen=True)
class Usage:
    used_bytes: int
    free_bytes: int
    free_inodes: int

    @property
    def full(self) -> bool:
        return self.free_bytes < FULL_BELOW or self.free_inodes == 0


class OutputVolumes:
    """The output file systems of every job under ``jobs_dir``."""

    def __init__(
        self, jobs_dir: Path, job_user: str | Callable[[], str], mounter: Mounter | None = None
    ) -> None:
        self.jobs_dir = jobs_dir
        # A callable is read at each create: a reload of runtime.job_user owns the next
        # job's output, never one already made.
        self._job_user = job_user if callable(job_user) else (lambda: job_user)
        self._mounter = mounter if mounter is not None else default_mounter()

    def job_dir(self, job_id: str) -> Path:
        """``<jobs_dir>/<job_id>``. Raises :class:`~agent.paths.UnsafeName`."""
        return child(self.jobs_dir, job_id)

    def mount_point(self, job_id: str) -> Path:
        return self.job_dir(job_id) / MOUNT_NAME

    def prepare(self, job_id: str) -> Path:
        """The job's empty mount point, nothing mounted on it yet (a leftover of an
        earlier attempt removed first); :meth:`make` mounts the file system there. A
        container may be created with it as a bind source meanwhile, but must not start
        before :meth:`make` returned: until then the directory is on the node's disk."""
        self.remove(job_id)
        job_dir = self.job_dir(job_id)
        self.jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        job_dir.mkdir(mode=0o700)
        target = job_dir / MOUNT_NAME
        target.mkdir(mode=0o700)
        return target

    def make(self, job_id: str, max_bytes: int, max_files: int) -> Path:
        """The job's output file system of its cap, made and mounted on the mount point
        :meth:`prepare` made; the mount point. On failure everything of the job's output
        is removed."""
        job_dir = self.job_dir(job_id)
        image, target = job_dir / IMAGE_NAME, job_dir / MOUNT_NAME
        size = image_size(max_bytes, max_files)
        try:
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            _run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-b",
                    str(BLOCK),
                    "-m",
                    "0",
                    "-N",
                    str(2 * max_files + 16),
                    "-O",
                    "^has_journal,^resize_inode",
                    "-E",
                    f"root_owner={self._job_user()},lazy_itable_init=1,nodiscard",
                    str(image),
                ],
                "making a job's output file system",
            )
            self._mounter.mount(image, target)
            # mkfs makes lost+found (root's); the job's output starts empty.
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(target / "lost+found")
            os.chmod(target, 0o700)
        except OSError as exc:
            self.remove(job_id)
            raise OutputFsError(f"a job's output file system: {exc.strerror}") from exc
        except OutputFsError:
            self.remove(job_id)
            raise
        log.info("output_fs_created", job_id=job_id, bytes=size)
        return target

    def ensure_mounted(self, job_id: str) -> Path | None:
        """The job's output mount point, mounting its image again if needed (after a
        reboot); None when the job has no output image. Raises :class:`OutputFsError`."""
        job_dir = self.job_dir(job_id)
        image, target = job_dir / IMAGE_NAME, job_dir / MOUNT_NAME
        if os.path.ismount(target):
            return target
        if not image.is_file():
            return None
        target.mkdir(mode=0o700, exist_ok=True)
        self._mounter.mount(image, target)
        return target

    def usage(self, job_id: str) -> Usage | None:
        """How full the job's output is; None when it is not mounted."""
        target = self.mount_point(job_id)
        if not os.path.ismount(target):
            return None
        st = os.statvfs(target)
        return Usage(
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            free_bytes=st.f_bavail * st.f_frsize,
            free_inodes=st.f_favail,
        )

    def remove(self, job_id: str) -> None:
        """Unmount and delete the job's output and its directory. Idempotent; raises
        :class:`OutputFsError` when the mount cannot be undone (nothing is deleted then:
        deleting under a live mount would delete the job's files one by one)."""
        job_dir = self.job_dir(job_id)
        target = job_dir / MOUNT_NAME
        if os.path.ismount(target):
            self._mounter.unmount(target)
            if os.path.ismount(target):
                raise OutputFsError("a job's output is still mounted after unmounting it")
        try:
            # Iterative and link-safe: a job directory left by an older agent may hold
            # a tree the job made, as deep as it liked.
            remove_tree(job_dir)
        except OSError as exc:
            raise OutputFsError(f"removing a job's directory: {exc.strerror}") from exc

    def leftovers(self, keep: set[str]) -> list[str]:
        """Job ids with a directory here that are not in ``keep``."""
        try:
            names = [e.name for e in os.scandir(self.jobs_dir) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n not in keep)
