"""Validation errors → ``check-config`` lines in the project's words.

Each line is ``dotted.key: what is wrong``. For the common kinds of error (wrong type,
missing, too small, not one of the allowed words, unknown key) the wording is ours, not
the validation library's: it names what the key expects, per field where the type alone
says too little (``runtime.allowed_images: expected a list of image patterns, got a
string``), and for an unknown key the nearest known key (``did you mean
max_concurrent_jobs?``). Anything else keeps the validator's own message, which for
this package's validators is already in these words.

Values are never echoed, except numbers, booleans and strings that look like one (the
``"30"`` that should be ``30``): a config value can be a secret pasted in the wrong place.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from agent.config.models import Config

# What a key expects, where its type alone would say too little. ``[]`` is any item of a
# list; ``*`` any key of a free-form mapping (labels).
_EXPECTED = {
    "node.id": "1 to 128 letters, digits, '.', '_' or '-'",
    "node.labels": "a mapping of label names to strings",
    "node.labels.*": "a string",
    "runtime.allowed_images": "a list of image patterns",
    "runtime.allowed_images[]": "an image pattern (a string)",
    "runtime.job_user": "UID:GID in numbers, e.g. 65534:65534",
    "gpus.allow": "all, or a list of GPU indexes or UUIDs",
    "gpus.allow[]": "a GPU index or UUID",
    "datastores": "a list of datastores, each with a name and a path",
    "datastores[]": "a datastore: a mapping with a name and a path",
    "datastores[].name": "1 to 64 letters, digits, '.', '_' or '-'",
    "control.group": "a group name: a letter or '_', then up to 63 letters, digits, "
    "'.', '_' or '-'",
}

# By error kind, when the key has no entry above.
_EXPECTED_BY_KIND = {
    "int_type": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "path_type": "a path (a string)",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a mapping of keys to values",
    "model_type": "a section: a mapping of keys to values",
    "union_type": "another kind of value",
}

# The markers the library inserts into a location for each alternative of a union
# (``gpus.allow``); a person needs the key, not the alternative.
_UNION_MARKERS = ("literal[", "tuple[", "union[")
_LOOKS_SCALAR = re.compile(r"^\s*([-+]?[0-9][0-9_.eE+-]*|true|false|yes|no|on|off)\s*$", re.I)


def format_location(loc: Iterable[int | str]) -> str:
    """``("datastores", 0, "path")`` → ``"datastores[0].path"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def describe_errors(errors: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per problem, in the order given, without repeats.

    A union key (``gpus.allow``) fails once per alternative; it gives one line, about
    its items when an item is what failed, else about the whole value.
    """
    errors = list(errors)
    item_failed = {_field(e["loc"]) for e in errors if _item_index(e["loc"]) is not None}
    lines: list[str] = []
    for error in errors:
        loc = error["loc"]
        if _is_union(loc):
            index = _item_index(loc)
            if index is None and _field(loc) in item_failed:
                continue  # the item's own line says more
            if index is None:  # one line for the value, whichever alternative failed
                error = {**error, "loc": _field(loc), "type": "union_type"}
            else:
                error = {**error, "loc": (*_field(loc), index)}
        for line in _describe(error):
            if line not in lines:
                lines.append(line)
    return lines


def _describe(error: Mapping[str, Any]) -> list[str]:
    loc = tuple(p for p in error["loc"] if not str(p).startswith("function-"))
    key = format_location(loc)
    kind = str(error["type"])
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "several_problems":
        return [f"{key}: {problem}" for problem in ctx["problems"]]
    if kind == "extra_forbidden":
        return [f"{key}: unknown key{_suggestion(loc)}"]
    if kind == "missing":
        return [f"{key}: required key is missing"]
    if kind == "string_pattern_mismatch":
        words = _EXPECTED.get(_pattern(loc)) or f"a string matching {ctx.get('pattern')}"
        return [f"{key}: must be {words}"]
    if kind in _EXPECTED_BY_KIND:
        return [f"{key}: expected {_expected(loc, kind)}, got {_got(value)}"]
    if kind == "literal_error":
        words = str(ctx.get("expected", "")).replace("'", "")
        one_of = "one of " if " or " in words else ""
        return [f"{key}: expected {one_of}{words}, got {_got(value)}"]
    if kind == "greater_than":
        bound = ctx["gt"]
        if isinstance(bound, int) and not isinstance(value, float):
            return [f"{key}: must be {bound + 1} or more, got {_number(value)}"]
        return [f"{key}: must be more than {bound:g}, got {_number(value)}"]
    if kind == "greater_than_equal":
        return [f"{key}: must be at least {ctx['ge']:g}, got {_number(value)}"]
    if kind == "less_than_equal":
        return [f"{key}: must be at most {ctx['le']:g}, got {_number(value)}"]
    if kind == "less_than":
        return [f"{key}: must be less than {ctx['lt']:g}, got {_number(value)}"]
    message = str(error["msg"]).removeprefix("Value error, ")
    return [f"{key}: {message}"]


def _expected(loc: tuple[int | str, ...], kind: str) -> str:
    return _EXPECTED.get(_pattern(loc)) or _EXPECTED_BY_KIND[kind]


def _pattern(loc: tuple[int | str, ...]) -> str:
    """The key of :data:`_EXPECTED` that a location falls under."""
    pattern = re.sub(r"\[\d+\]", "[]", format_location(loc))
    if pattern.startswith("node.labels."):
        return "node.labels.*"
    return pattern


def _got(value: object) -> str:
    if value is None:
        return "nothing (the key has no value)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"the whole number {value}"
    if isinstance(value, float):
        return f"the number {value:g}"
    if isinstance(value, str):
        if len(value) <= 16 and _LOOKS_SCALAR.match(value):
            return f'the string "{value}" (write it without quotes)'
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _suggestion(loc: tuple[int | str, ...]) -> str:
    """``"; did you mean X?"`` for an unknown key, or ``""``.

    The nearest key of the same section first; else the same or a near name in another
    section (``runtime.max_cpus`` → ``limits.max_cpus``).
    """
    name = str(loc[-1])
    section = _model_at(loc[:-1])
    if section is not None:
        fields = list(section.model_fields)
        # A shortened name (``desc``) is too far from its key for difflib alone.
        near = (
            difflib.get_close_matches(name, fields, n=1)
            or [field for field in fields if len(name) >= 3 and field.startswith(name)][:1]
        )
        if near:
            return f"; did you mean {near[0]}?"
    everywhere = dict(_all_keys(Config, ""))
    near = difflib.get_close_matches(name, list(everywhere), n=1, cutoff=0.8)
    return f"; did you mean {everywhere[near[0]]}?" if near else ""


def _all_keys(model: type[BaseModel], prefix: str) -> Iterable[tuple[str, str]]:
    for name, field in model.model_fields.items():
        yield name, prefix + name
        inner = _model_in(field.annotation)
        if inner is not None:
            list_of = typing.get_origin(field.annotation) is tuple
            yield from _all_keys(inner, f"{prefix}{name}{'[0]' if list_of else ''}.")


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The section model a location points into; ``None`` for free-form values."""
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list of sections has the list's section type
        field = model.model_fields.get(part)
        inner = _model_in(field.annotation) if field is not None else None
        if inner is None:
            return None
        model = inner
    return model


def _model_in(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (tuple, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := _model_in(arg)) is not None:
                return found
    return None


def _is_union(loc: tuple[int | str, ...]) -> bool:
    return any(isinstance(p, str) and p.startswith(_UNION_MARKERS) for p in loc)


def _field(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """The key a union belongs to: the location up to its first alternative's marker."""
    for i, part in enumerate(loc):
        if isinstance(part, str) and part.startswith(_UNION_MARKERS):
            return tuple(loc[:i])
    return tuple(loc)


def _item_index(loc: tuple[int | str, ...]) -> int | None:
    """The list index inside a union's alternative (``gpus.allow[2]``), if any."""
    if not _is_union(loc):
        return None
    rest = loc[len(_field(loc)) :]
    return next((p for p in rest if isinstance(p, int)), None)
