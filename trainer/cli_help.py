"""`--help` text for the key=value command lines, from the config dataclasses' own comments.

    lines = describe_keys(PasskeyConfig)                      # ["checkpoint: ???  # a run dir ...", ...]
    lines = describe_keys(Config, values=composed_cfg)         # current values of a composed Hydra config
    python -m trainer.train --help                             # train_help(): groups and keys, via Hydra

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


TRAIN_HELP = """python -m trainer.train [KEY=VALUE ...]: train a GPT (Hydra command line; presets in configs/)

  python -m trainer.train                                   the default CPU run (experiment=cpu_default)
  python -m trainer.train experiment=cpu_passkey            another preset
  python -m trainer.train model=llama_220m data.seq_len=4096 optim.lr=6e-4 train.steps=1000
  torchrun --nproc_per_node=N -m trainer.train parallel.dp=N ...     several processes (GPUs)

The run directory is outputs/<run_name>: the preset's name, plus a short hash of the overrides that change
the run (all but train.steps, logging / evaluation / checkpoint intervals, logger.*, eval.*), so the same
command resumes its run and another command starts its own; run_name=NAME names it. Ctrl-C saves a
checkpoint at the end of the current step and exits (130); the same command then resumes.

== Config groups (group=option) ==
$APP_CONFIG_GROUPS
== Keys (key: value with this command line  # meaning) ==
$KEYS

--cfg job prints the composed config; --hydra-help lists Hydra's own flags.
"""


def train_help(*, _root_) -> str:
    """hydra.help.template of configs/train.yaml (resolver `trainer_help`, registered by trainer.config): Hydra
    substitutes $APP_CONFIG_GROUPS; the keys come from the schema's comments with the composed values."""
    from trainer.config import Config

    keys = "\n".join(describe_keys(Config, _root_)).replace("$", "$$")
    return TRAIN_HELP.replace("$KEYS", keys)
