"""Shared helpers of the command-line configurations: read YAML / TOML, list every problem."""

from __future__ import annotations

__all__ = ["ConfigError", "read_config_file", "validate_model"]

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomllib
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration is malformed; the message lists every problem with its key."""


def read_config_file(path: str | os.PathLike[str], what: str = "configuration") -> dict[str, Any]:
    """Parse a ``.yaml`` / ``.yml`` / ``.toml`` file whose top level is a mapping.

    Arguments:
        path: the file.
        what: how messages name the file (e.g. ``"fill configuration"``).

    Returns:
        The parsed mapping.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: wrong suffix, a syntax error, or a top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{what} {path} does not exist"
        raise FileNotFoundError(msg)
    suffix = path.suffix.lower()
    if suffix not in {".toml", ".yaml", ".yml"}:
        msg = f"{what} {path}: use a .yaml, .yml or .toml file"
        raise ConfigError(msg)
    import yaml

    text = path.read_text()
    try:
        raw = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        msg = f"{path} cannot be parsed: {err}"
        raise ConfigError(msg) from None
    if not isinstance(raw, Mapping):
        msg = f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}"
        raise ConfigError(msg)
    return dict(raw)


def validate_model(
    model: type[Model],
    raw: Mapping[str, Any],
    where: str,
    cross_check: Callable[[Mapping[str, Any]], list[str]] | None = None,
) -> Model:
    """Validate ``raw`` with a pydantic model and report every problem at once.

    Arguments:
        model: the pydantic model (``extra="forbid"`` so unknown keys are problems too).
        raw: the parsed document.
        where: the file or source named in the message.
        cross_check: optional checks between keys, run on the raw document even when
            the model found problems; returns ``"key.path: problem"`` lines.

    Returns:
        The validated model.

    Raises:
        ConfigError: one line per problem, each starting with its dotted key.
    """
    problems: list[str] = []
    result = None
    try:
        result = model.model_validate(raw)
    except ValidationError as err:
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            problems.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    if cross_check is not None:
        problems.extend(cross_check(raw))
    if problems or result is None:
        msg = f"{where} has {len(problems)} problem(s):\n  " + "\n  ".join(problems)
        raise ConfigError(msg)
    return result
