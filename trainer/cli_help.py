"""`--help` text for the key=value command lines, from the config dataclasses' own comments.

    lines = describe_keys(PasskeyConfig)                      # ["checkpoint: ???  # a run dir ...", ...]
    lines = describe_keys(Config, values=composed_cfg)         # current values of a composed Hydra config

A field's meaning is its trailing comment, or the comment lines right above it; a field holding a dataclass is
listed key by key under its name (model.dim, train.steps, ...). The help is thus never out of step with the
schema.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Optional

_FIELD = re.compile(r"^    (\w+)\s*:[^=#]*(?:=(?:[^#\"']|\"[^\"]*\"|'[^']*')*)?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^    #\s?(.*)$")


def field_comments(cls) -> dict[str, str]:
    """Field name -> its comment in the class source ('' where there is none)."""
    try:
        source = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in source:
        m = _COMMENT.match(line)
        if m:
            above.append(m.group(1).strip())
            continue
        m = _FIELD.match(line)
        if m:
            out[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        above = []
    return out


def _nested(f: dataclasses.Field) -> Optional[type]:
    if f.default_factory is not dataclasses.MISSING:
        made = f.default_factory()
        if dataclasses.is_dataclass(made):
            return type(made)
    return None


def describe_keys(cls, values: Any = None, prefix: str = "") -> list[str]:
    """One line per leaf key: `key: value  # meaning`; value from `values` (a DictConfig / object) when given,
    else the dataclass default."""
    from omegaconf import OmegaConf

    comments = field_comments(cls)
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        sub = _nested(f)
        if sub is not None:
            lines += describe_keys(sub, values, f"{key}.")
            continue
        if values is not None:
            try:
                value = OmegaConf.select(values, key, throw_on_missing=False)
            except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's job (shown unresolved)
                value = OmegaConf.select(values, key, throw_on_resolution_failure=False)
        else:
            value = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "???")
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        text = f"{key}: {value}"
        lines.append(f"{text:<44}  # {comments[f.name]}" if comments.get(f.name) else text)
    return lines
