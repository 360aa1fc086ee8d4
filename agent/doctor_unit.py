"""The systemd unit against the config: can the agent write its state directory there?

Under ``ProtectSystem=strict`` only ``StateDirectory=`` (``/var/lib/NAME``) and
``ReadWritePaths=`` are writable; a ``state_dir`` elsewhere gives a read-only state
directory and a restart loop. ``ProtectHome=`` hides ``/home``, ``/root`` and
``/run/user``: a datastore there "does not exist" for the service.

The unit is the installed one (``/etc/systemd/system`` first, then the packaged
locations) with its drop-ins, parsed for those keys only: later assignments add to
the list, an empty one clears it, as systemd does.
"""

from __future__ import annotations

from pathlib import Path

from agent.config import Config
from agent.doctor_checks import Check

UNIT = "cloudbender-agent.service"
UNIT_DIRS = tuple(
    Path(d)
    for d in (
        "/etc/systemd/system",
        "/run/systemd/system",
        "/usr/local/lib/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
    )
)
HIDDEN_BY_PROTECT_HOME = (Path("/home"), Path("/root"), Path("/run/user"))


def find_unit() -> Path | None:
    """The installed unit file, or ``None``."""
    return next((d / UNIT for d in UNIT_DIRS if (d / UNIT).is_file()), None)


def read_service_keys(unit: Path) -> dict[str, list[str]]:
    """``[Service]`` values of ``unit`` and its ``UNIT.d/*.conf`` drop-ins, per key."""
    files = [unit]
    for d in (unit.parent, *UNIT_DIRS):
        files += sorted((d / f"{UNIT}.d").glob("*.conf"))
    keys: dict[str, list[str]] = {}
    for file in dict.fromkeys(files):  # one file once, in order
        section = ""
        for raw in file.read_text(encoding="utf-8", errors="replace").splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            key, sep, value = line.partition("=")
            if section != "[Service]" or not sep:
                continue
            words = value.split()
            keys[key.strip()] = keys.get(key.strip(), []) + words if words else []
    return keys


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_unit(config: Config, unit: Path | None) -> list[Check]:
    """The unit's write and hide rules against ``state_dir`` and the datastores."""
    if unit is None:
        unit = find_unit()
    if unit is None:
        return [Check("skip", f"no {UNIT} installed: nothing to compare with state_dir")]
    try:
        keys = read_service_keys(unit)
    except OSError as exc:
        return [Check("fail", f"{unit} cannot be read: {exc.strerror}")]
    state = config.state_dir
    writable = [Path("/var/lib") / name for name in keys.get("StateDirectory", [])]
    # "-" (ignore if missing) and "+" (outside the root directory) prefixes.
    writable += [Path(p.lstrip("-+")) for p in keys.get("ReadWritePaths", [])]
    strict = (keys.get("ProtectSystem") or [""])[-1] == "strict"
    checks = []
    if strict and not any(_under(state, root) for root in writable):
        checks.append(
            Check(
                "fail",
                f"{unit}: state_dir {state} is read-only under ProtectSystem=strict "
                "(not under StateDirectory= or ReadWritePaths=)",
                f"systemctl edit cloudbender-agent: [Service] ReadWritePaths={state}",
            )
        )
    else:
        checks.append(Check("ok", f"{unit}: state_dir {state} is writable for the service"))
    if (keys.get("ProtectHome") or [""])[-1] in ("true", "yes", "read-only", "tmpfs"):
        for store in config.datastores:
            if any(_under(store.path, root) for root in HIDDEN_BY_PROTECT_HOME):
                checks.append(
                    Check(
                        "fail",
                        f"{unit}: datastore {store.name} ({store.path}) is hidden from the "
                        "service by ProtectHome=",
                        "move the datastore out of /home, /root and /run/user",
                    )
                )
    return checks
