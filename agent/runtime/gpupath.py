"""Which way, if any, this Docker engine can give a job container NVIDIA GPUs.

NVIDIA ships two setups, and Docker serves each through a different device request:

``cdi``
    Docker 25+ with CDI enabled (``docker info`` lists ``CDISpecDirs``) and an NVIDIA
    CDI spec (``nvidia-ctk cdi generate``) naming the GPUs by UUID. The request is
    driver ``cdi`` with ids ``nvidia.com/gpu=<UUID>``; the engine itself adds the device
    nodes and libraries the spec lists, whatever the container's environment says.
``legacy``
    Docker's built-in ``nvidia`` device driver, which the engine registers only when
    ``nvidia-container-runtime-hook`` is on dockerd's PATH when dockerd starts. The
    request is driver ``nvidia`` with the GPU UUIDs; the engine passes them to the hook
    as ``NVIDIA_VISIBLE_DEVICES``. The hook refuses such requests when the toolkit's
    ``mode`` is ``cdi``/``jit-cdi``/``csv``, and with
    ``accept-nvidia-visible-devices-envvar-when-unprivileged = false`` it ignores the
    variable for containers without CAP_SYS_ADMIN (ours never have it): the job would
    start with no GPU at all.

:func:`choose_gpu_path` is pure (recorded ``docker info`` outputs and toolkit configs
are its tests); :func:`probe_gpu_path` gathers the facts from this host. CDI is
preferred when both work: it does not rest on an environment variable the hook may
be configured to ignore.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

HOOK = "nvidia-container-runtime-hook"
TOOLKIT_CONFIG = Path("/etc/nvidia-container-runtime/config.toml")
# dockerd's PATH is not ours to read (its /proc environ is root's); these are where the
# toolkit's packages put the hook, and what a systemd-started dockerd has on its PATH.
HOOK_DIRS = (Path("/usr/bin"), Path("/usr/local/bin"), Path("/usr/sbin"), Path("/bin"))
DEFAULT_CDI_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))
CDI_KIND = "nvidia.com/gpu"
ENVVAR_KEY = "accept-nvidia-visible-devices-envvar-when-unprivileged"
# Modes in which the hook accepts Docker's nvidia-driver requests ("auto" resolves to
# legacy on every non-Tegra host, and to cdi only for images that ask for CDI devices).
HOOK_MODES = ("auto", "legacy")

GpuPathKind = Literal["legacy", "cdi"]


@dataclass(frozen=True)
class ToolkitConfig:
    """The parts of the toolkit's config.toml that decide the legacy path.

    ``error`` is set (and the rest are the toolkit's defaults) when the file exists but
    cannot be read or parsed."""

    mode: str = "auto"
    accept_envvar_unprivileged: bool = True
    error: str | None = None


@dataclass(frozen=True)
class CdiSpec:
    """An NVIDIA CDI spec file and the device names it offers (``GPU-…``, ``0``, ``all``)."""

    path: Path
    names: tuple[str, ...]

    @property
    def by_uuid(self) -> bool:
        return any(n.startswith(("GPU-", "MIG-")) for n in self.names)


@dataclass(frozen=True)
class GpuPath:
    """The path jobs' GPUs take (``None``: this engine cannot give GPUs) and why, in words
    a person can act on."""

    kind: GpuPathKind | None
    why: str

    @property
    def usable(self) -> bool:
        return self.kind is not None

    def describe(self) -> str:
        if self.kind is None:
            return f"cannot give GPUs: {self.why}"
        return f"GPUs through {self.kind}: {self.why}"


def parse_toolkit_config(text: str) -> ToolkitConfig:
    """The toolkit's settings from config.toml's text (missing keys: the toolkit's defaults)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return ToolkitConfig(error=f"cannot parse it: {exc}")
    runtime = data.get("nvidia-container-runtime")
    mode = runtime.get("mode", "auto") if isinstance(runtime, dict) else "auto"
    accept = data.get(ENVVAR_KEY, True)
    return ToolkitConfig(mode=str(mode), accept_envvar_unprivileged=accept is not False)


def parse_cdi_spec(path: Path, text: str) -> CdiSpec | None:
    """The spec in ``text`` if it is an NVIDIA GPU spec (kind ``nvidia.com/gpu``), else None."""
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or data.get("kind") != CDI_KIND:
        return None
    devices = data.get("devices") or []
    names = tuple(str(d["name"]) for d in devices if isinstance(d, dict) and "name" in d)
    return CdiSpec(path, names)


def _cdi_choice(cdi_dirs: Sequence[str], specs: Sequence[CdiSpec]) -> tuple[GpuPath | None, str]:
    if not cdi_dirs:
        return None, "the engine reports no CDI spec dirs (CDI needs Docker 25+ with CDI enabled)"
    where = ", ".join(cdi_dirs)
    if not specs:
        return None, f"no NVIDIA CDI spec in {where} (nvidia-ctk cdi generate)"
    for spec in specs:
        if spec.by_uuid:
            return GpuPath("cdi", f"the engine has CDI and {spec.path} names the GPUs by UUID"), ""
    return None, (
        f"the NVIDIA CDI spec {specs[0].path} does not name GPUs by UUID "
        "(nvidia-ctk cdi generate --device-name-strategy=uuid)"
    )


def _legacy_choice(hook: str | None, toolkit: ToolkitConfig | None) -> tuple[GpuPath | None, str]:
    if hook is None:
        return None, f"{HOOK} is not installed, so Docker has no nvidia device driver"
    settings = toolkit or ToolkitConfig()
    if settings.error is not None:
        return None, f"the toolkit's {TOOLKIT_CONFIG}: {settings.error}"
    if settings.mode not in HOOK_MODES:
        return None, (
            f"the toolkit's mode is {settings.mode!r}: its hook refuses Docker's nvidia "
            'device requests (set mode = "auto", or use CDI)'
        )
    if not settings.accept_envvar_unprivileged:
        return None, (
            f"{ENVVAR_KEY} = false: the hook ignores the GPUs Docker passes to unprivileged "
            "containers, so every job would start without its GPUs"
        )
    return GpuPath("legacy", f"{hook} is installed, toolkit mode {settings.mode!r}"), ""


def choose_gpu_path(
    engine_info: Mapping[str, Any],
    toolkit: ToolkitConfig | None,
    hook: str | None,
    specs: Sequence[CdiSpec],
) -> GpuPath:
    """The path GPU jobs take on an engine that reports ``engine_info`` (``docker info``),
    with the toolkit's ``toolkit`` config (``None``: no config file), the hook at ``hook``
    (``None``: not installed) and the NVIDIA CDI ``specs`` found in the engine's CDI dirs.
    """
    cdi_dirs = [str(d) for d in engine_info.get("CDISpecDirs") or ()]
    cdi, cdi_no = _cdi_choice(cdi_dirs, specs)
    if cdi is not None:
        return cdi
    legacy, legacy_no = _legacy_choice(hook, toolkit)
    if legacy is not None:
        return legacy
    return GpuPath(None, f"CDI: {cdi_no}; legacy hook: {legacy_no}")


def find_hook(dirs: Sequence[Path] = HOOK_DIRS) -> str | None:
    """Where ``nvidia-container-runtime-hook`` is, on our PATH or in the usual dirs."""
    found = shutil.which(HOOK)
    if found is not None:
        return found
    for directory in dirs:
        candidate = directory / HOOK
        if candidate.is_file():
            return str(candidate)
    return None


def read_toolkit_config(path: Path = TOOLKIT_CONFIG) -> ToolkitConfig | None:
    try:
        return parse_toolkit_config(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        return ToolkitConfig(error=f"cannot read it: {exc}")


def find_cdi_specs(dirs: Sequence[Path]) -> list[CdiSpec]:
    specs = []
    for directory in dirs:
        try:
            files = sorted(directory.iterdir())
        except OSError:
            continue
        for path in files:
            if path.suffix not in (".yaml", ".yml", ".json"):
                continue
            try:
                spec = parse_cdi_spec(path, path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
            if spec is not None:
                specs.append(spec)
    return specs


def probe_gpu_path(
    engine_info: Mapping[str, Any],
    *,
    cdi_dirs: Sequence[Path] | None = None,
    toolkit_config: Path = TOOLKIT_CONFIG,
    hook_dirs: Sequence[Path] = HOOK_DIRS,
) -> GpuPath:
    """:func:`choose_gpu_path` with this host's facts. ``cdi_dirs`` replaces the engine's
    ``CDISpecDirs`` (tests: as if the engine had CDI enabled with those dirs)."""
    info = dict(engine_info)
    if cdi_dirs is not None:
        info["CDISpecDirs"] = [str(d) for d in cdi_dirs]
    dirs = [Path(d) for d in info.get("CDISpecDirs") or ()]
    return choose_gpu_path(
        info, read_toolkit_config(toolkit_config), find_hook(hook_dirs), find_cdi_specs(dirs)
    )
