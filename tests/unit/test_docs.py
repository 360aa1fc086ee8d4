"""The project's documents tell the truth about the project.

A reader follows README.md and docs/*.md: every relative link must land on a file of
this repository (and on a heading, when it names one), no link may point outside the
repository, every ``cloudbender-agent``, ``cloudbender-cp`` and ``make`` command shown
must exist with the options shown, and every config key shown must be one the agent
accepts. The commands are read from the real argument parsers (each entry point of
pyproject.toml, called with its parser's ``parse_args`` intercepted) and the Makefile;
the keys from the config model.
"""

from __future__ import annotations

import argparse
import importlib
import re
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml
from pydantic import BaseModel

from agent.config.models import Config

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMANDS = ("cloudbender-agent", "cloudbender-cp")

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
_INLINE = re.compile(r"`([^`\n]+)`")
# Where a command may start inside a code span or a line of a code block.
_STARTS = re.compile(r"(?:^|&&|\|\||;|\$\(|^\$ )\s*(?:sudo\s+)?")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _FENCE.sub("", path.read_text()).splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links() -> Iterator[tuple[Path, str]]:
    for doc in DOCS:
        text = _FENCE.sub("", doc.read_text())
        for target in _LINK.findall(_INLINE.sub("``", text)):
            yield doc, target


def _code(doc: Path) -> Iterator[str]:
    """Each line of each fenced block and each inline code span of ``doc``."""
    text = doc.read_text()
    for _lang, body in _FENCE.findall(text):
        yield from body.splitlines()
    yield from _INLINE.findall(_FENCE.sub("", text))


# --- links ---------------------------------------------------------------------------


def test_every_relative_link_resolves_inside_the_repository() -> None:
    """The README and docs pointed to PROTOCOL.md, DESIGN.md and SECURITY.md, which are
    not in the repository: a reader of a fresh clone followed links to nothing."""
    problems = []
    for doc, target in _links():
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / unquote(path_part)).resolve() if path_part else doc
        where = f"{_rel(doc)}: ({target})"
        if not dest.is_relative_to(REPO):
            problems.append(f"{where} points outside the repository")
        elif not dest.exists():
            problems.append(f"{where} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{where} has no heading #{anchor}")
    assert problems == []


def test_no_document_names_the_contract_files_kept_outside_the_repository() -> None:
    """The shared PROTOCOL.md / DESIGN.md / SECURITY.md are not shipped: a reader (or a
    docstring) that cites them sends people to files they cannot open."""
    pattern = re.compile(r"\b(?:PROTOCOL|DESIGN|SECURITY)\.md\b|\.\./shared")
    sources = [*DOCS, REPO / "config.example.yaml", *sorted((REPO / "agent").rglob("*.py"))]
    found = [
        f"{_rel(path)}:{n}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []


# --- commands ------------------------------------------------------------------------


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _parser_of(command: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser behind the console script ``command`` of pyproject.toml."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert command in scripts, f"pyproject.toml has no console script {command}"
    module, _, func = scripts[command].partition(":")

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> Any:
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    try:
        getattr(importlib.import_module(module), func)(["--help"])
    except _Captured as got:
        return got.parser
    raise AssertionError(f"{command}'s main never parsed its arguments")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def _shown(word: str) -> Iterator[tuple[Path, list[str]]]:
    """Each command line starting with ``word`` in the docs: (doc, its words after it)."""
    start = re.compile(_STARTS.pattern + re.escape(word) + r"(?=\s|$)")
    for doc in DOCS:
        for line in _code(doc):
            for m in start.finditer(line):
                rest = re.split(r"\s#|\s\||\|\||&&|;", line[m.end() :])[0]
                yield doc, [w.strip("[](){}'\"") for w in rest.split()]


def test_the_shown_command_lines_are_found_in_the_docs() -> None:
    """Guards the extraction itself: a parser change that saw no commands would pass
    every command check below without checking anything."""
    shown = {word: {tuple(words[:1]) for _doc, words in _shown(word)} for word in COMMANDS}
    assert ("status",) in shown["cloudbender-agent"]
    assert ("audit",) in shown["cloudbender-agent"]
    assert ("submit",) in shown["cloudbender-cp"]
    assert {words[0] for _doc, words in _shown("make") if words} >= {"demo", "test"}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_shown_exists_with_its_options(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README showed ``make demo`` and commands that were not there yet: a reader
    typing what the docs show must get that command, not a usage error."""
    parser = _parser_of(command, monkeypatch)
    problems = []
    for doc, words in _shown(command):
        current, path = parser, [command]
        for word in words:
            if word.startswith("-"):
                option = word.split("=", 1)[0]
                if option not in _options(current) | _options(parser):
                    problems.append(f"{_rel(doc)}: {' '.join(path)} has no option {option}")
                continue
            sub = _subcommands(current)
            if not sub:
                continue  # an argument of the command (JOB, PATH, …)
            if word not in sub:
                problems.append(f"{_rel(doc)}: {' '.join(path)} has no command {word!r}")
                break
            current, path = sub[word], [*path, word]
    assert problems == []


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {
        target
        for line in text.splitlines()
        if (m := re.match(r"([A-Za-z0-9_. -]+):(?!=)", line))
        for target in m.group(1).split()
    }


def test_every_make_target_shown_exists() -> None:
    """``make demo`` was in the README while the Makefile only said "not available"; a
    target the docs show must at least be in the Makefile."""
    targets = _make_targets()
    missing = {
        f"{_rel(doc)}: make {words[0]}"
        for doc, words in _shown("make")
        if words and not words[0].startswith("-") and "=" not in words[0]
        if words[0] not in targets
    }
    assert missing == set()


# --- config keys ---------------------------------------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _key_problem(model: type[BaseModel], path: list[str]) -> str | None:
    """Why ``path`` (``["control_plane", "reconnect", "max_s"]``) is not a key, or None."""
    for i, key in enumerate(path):
        field = model.model_fields.get(key)
        if field is None:
            return f"{'.'.join(path[: i + 1])}: unknown key"
        models = _models_in(field.annotation)
        if not models:
            # A leaf, or a free-form mapping such as node.labels: nothing below to check.
            return None
        model = models[0]
    return None


def _yaml_paths(node: Any, prefix: list[str]) -> Iterator[list[str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield [*prefix, str(key)]
            yield from _yaml_paths(value, [*prefix, str(key)])
    elif isinstance(node, list):
        for item in node:
            yield from _yaml_paths(item, prefix)


def _config_blocks() -> Iterator[tuple[str, Any]]:
    yield "config.example.yaml", yaml.safe_load((REPO / "config.example.yaml").read_text())
    sections = set(Config.model_fields)
    for doc in DOCS:
        for lang, body in _FENCE.findall(doc.read_text()):
            if lang not in ("yaml", "yml"):
                continue
            data = yaml.safe_load(body)
            # A job file or a message shares a few names with the config (results,
            # gpus); a config snippet is one whose top-level keys are mostly sections.
            if isinstance(data, dict) and 2 * len(set(data) & sections) > len(data):
                yield _rel(doc), data


_SECTIONS = "|".join(sorted(Config.model_fields, key=len, reverse=True))
# A dotted key shown inline: `control_plane.allow_insecure`, `datastores[0].path`.
_DOTTED = re.compile(rf"^(?:{_SECTIONS})(?:\[\d+\])?(?:\.[a-z_]+)+(?:: .*)?$")
# ... but not a file name: `results.py`, `gpus.md`.
_FILE_NAME = re.compile(r"\.(?:py|md|yaml|yml|json|jsonl|sh|db|img|txt|pem|key|crt|csr)$")
# Protocol fields that share a first word with a config section; not config keys.
_PROTOCOL_FIELDS = {"gpus.types", "gpus.count", "runtime.version", "runtime.engine"}


def test_every_config_key_shown_exists() -> None:
    """A key the docs show but the agent does not know is refused by check-config (exit
    78): a consumer copying the docs would get a node that does not start."""
    problems = []
    for where, data in _config_blocks():
        for path in _yaml_paths(data, []):
            if (problem := _key_problem(Config, path)) is not None:
                problems.append(f"{where}: {problem}")
    for doc in DOCS:
        for span in _INLINE.findall(_FENCE.sub("", doc.read_text())):
            key = span.split(":", 1)[0].strip()
            if not _DOTTED.match(span) or _FILE_NAME.search(key) or key in _PROTOCOL_FIELDS:
                continue
            path = re.sub(r"\[\d+\]", "", key).split(".")
            if (problem := _key_problem(Config, path)) is not None:
                problems.append(f"{_rel(doc)}: {problem}")
    assert problems == []


def test_the_config_key_check_sees_the_keys_the_docs_show() -> None:
    """Guards the extraction: the README's control_plane block and config.example.yaml
    must be read, and an unknown key must be caught."""
    wheres = {where for where, _data in _config_blocks()}
    assert {"config.example.yaml", "README.md"} <= wheres
    assert _key_problem(Config, ["control_plane", "reconnect", "max_s"]) is None
    assert _key_problem(Config, ["node", "colour"]) == "node.colour: unknown key"
    assert _key_problem(Config, ["node", "labels", "site"]) is None
