"""Reading the YAML file: duplicate keys refused, every problem named by its key."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agent.config.models import Config
from agent.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/cloudbender-agent/config.yaml")
CONFIG_ENV = "CLOUDBENDER_AGENT_CONFIG"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node)
    return mapping


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def format_location(loc: tuple[int | str, ...]) -> str:
    """``("datastores", 0, "path")`` → ``"datastores[0].path"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(p for p in error["loc"] if not str(p).startswith("function-"))
    # Strict unions report each alternative; the key is what a person needs.
    loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith(("literal[", "tuple["))))
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{format_location(loc)}: unknown key"
    if kind == "missing":
        return f"{format_location(loc)}: required key is missing"
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    value = error.get("input")
    if kind.endswith("_type") and not isinstance(value, dict | list):
        message += f" (got {type(value).__name__} {value!r})"
    return f"{format_location(loc)}: {message}"


def _duplicate_datastores(data: Mapping[str, Any]) -> list[str]:
    # Checked on the raw list, apart from pydantic, so that a duplicate name is reported
    # even when an entry also has a problem of its own.
    stores = data.get("datastores")
    if not isinstance(stores, list):
        return []
    first: dict[str, int] = {}
    problems = []
    for i, entry in enumerate(stores):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue
        if name in first:
            problems.append(
                f"datastores[{i}].name: {name!r} is already used by datastores[{first[name]}]"
            )
        else:
            first[name] = i
    return problems


def parse_config(data: object) -> Config:
    """Validate already-parsed YAML. Raises :class:`ConfigError` listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): must be a mapping of keys, not {type(data).__name__}"])
    problems: list[str] = []
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            line = _describe(error)
            if line not in problems:
                problems.append(line)
    problems += _duplicate_datastores(data)
    if problems or config is None:
        raise ConfigError(problems)
    return config


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_config(path: Path | None = None) -> Config:
    """Read and validate the YAML file at ``path`` (default: env var, then /etc).

    Raises :class:`ConfigError` with every problem found; never returns a partial config.
    """
    path = path or default_config_path()
    return parse_config(_parse_yaml(_read_text(path), path))


def load_sections(
    path: Path | None, sections: Sequence[str], *, unreadable_ok: bool = False
) -> tuple[Config, list[str]]:
    """The lenient read for local commands (``status``, ``jobs``, ``logs``, ``audit``,
    ``gpus``): only the top-level keys in ``sections`` are taken from the file and
    validated; every other key keeps its default.

    Returns that config and the problems found elsewhere in the file, for a note (a
    token file with mode 0644 must not send ``status`` to the wrong port). With
    ``unreadable_ok``, a file that does not exist or cannot be read (a non-root user,
    ``/etc/cloudbender-agent`` being 0700) gives the defaults and that one problem.
    Raises :class:`ConfigError` when the file is not valid YAML, when a section the
    command needs is invalid, or when it cannot be read and not ``unreadable_ok``.
    The config returned is for that command only; never hand it to the daemon.
    """
    path = path or default_config_path()
    try:
        text = _read_text(path)
    except ConfigError as exc:
        if not unreadable_ok:
            raise
        return parse_config({}), exc.problems
    data = _parse_yaml(text, path)
    if data is not None and not isinstance(data, dict):
        raise ConfigError([f"(top level): must be a mapping of keys, not {type(data).__name__}"])
    data = data or {}
    config = parse_config({key: data[key] for key in sections if key in data})
    try:
        parse_config(data)
    except ConfigError as exc:
        return config, exc.problems
    return config, []


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot be read: {exc}"]) from exc


def _parse_yaml(text: str, path: Path) -> object:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from exc
