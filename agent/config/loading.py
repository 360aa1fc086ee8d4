"""Reading the YAML file: every problem named by its key, duplicate keys among them."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agent.config.messages import describe_errors, format_location
from agent.config.models import Config
from agent.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/cloudbender-agent/config.yaml")
CONFIG_ENV = "CLOUDBENDER_AGENT_CONFIG"


def duplicate_keys(node: yaml.Node | None) -> list[str]:
    """A problem line for each key written more than once in the same mapping.

    Found on the parsed node tree, before anything is built from it, so that the rest of
    the file is still validated and every other problem reported with it (the loader
    keeps the last value of a repeated key, as YAML libraries do). Aliases are walked
    once: a node reached twice is the same node.
    """
    problems: list[tuple[int, str]] = []
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[int | str, ...]]] = [] if node is None else [(node, ())]
    while stack:
        current, loc = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, yaml.SequenceNode):
            stack += [(item, (*loc, i)) for i, item in enumerate(current.value)]
        elif isinstance(current, yaml.MappingNode):
            lines: dict[tuple[str, str], list[int]] = {}
            for key_node, value_node in current.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                lines.setdefault((key_node.tag, key_node.value), []).append(
                    key_node.start_mark.line + 1
                )
                stack.append((value_node, (*loc, str(key_node.value))))
            for (_tag, key), where in lines.items():
                if len(where) > 1:
                    listed = ", ".join(map(str, where[:-1])) + f" and {where[-1]}"
                    line = f"{format_location((*loc, key))}: duplicate key (lines {listed}); "
                    problems.append((where[0], line + "keep one of them"))
    return [line for _first, line in sorted(problems)]


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


def parse_config(data: object, *, problems: Sequence[str] = ()) -> Config:
    """Validate already-parsed YAML. Raises :class:`ConfigError` listing every problem.

    ``problems`` are ones already found in the file (duplicate keys): listed first, and
    the file is still validated so that they hide nothing.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [*problems, f"(top level): must be a mapping of keys, not {type(data).__name__}"]
        )
    found = list(problems)
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        found += describe_errors(exc.errors())
    found += _duplicate_datastores(data)
    if found or config is None:
        raise ConfigError(found)
    return config


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_config(path: Path | None = None) -> Config:
    """Read and validate the YAML file at ``path`` (default: env var, then /etc).

    Raises :class:`ConfigError` with every problem found; never returns a partial config.
    """
    path = path or default_config_path()
    data, duplicates = _parse_yaml(_read_text(path), path)
    return parse_config(data, problems=duplicates)


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
    data, duplicates = _parse_yaml(text, path)
    if data is not None and not isinstance(data, dict):
        raise ConfigError([f"(top level): must be a mapping of keys, not {type(data).__name__}"])
    data = data or {}
    # A key repeated inside a section the command reads makes that section ambiguous.
    mine = [line for line in duplicates if re.split(r"[.\[:]", line, maxsplit=1)[0] in sections]
    config = parse_config({key: data[key] for key in sections if key in data}, problems=mine)
    try:
        parse_config(data, problems=duplicates)
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


def _parse_yaml(text: str, path: Path) -> tuple[object, list[str]]:
    """The file's data, and a problem line per duplicate key (see :func:`duplicate_keys`)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
        return data, duplicate_keys(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from exc
    finally:
        loader.dispose()
