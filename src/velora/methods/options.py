"""``MethodOptions``: every method's config side by side, and the ONE translation between them and the flat
spellings users type — CLI flags, ``TrainConfig.options`` keys, planner ``**options`` and HF
``method_options`` dicts.

A method's config class names its section (``FloraConfig.section = "flora"``: ``options.flora``) and its flat-key
prefix; registering the method (``registry.register(BaseMethod(..., config=FloraConfig))``) registers the
section, so a new method's options, keys and flags come from its own folder. A flat key is
``<config prefix>_<field>`` (``lora_rank``, ``flora_kappa``, ``gradnorm_proj_rank``) unless the field declares
another (``optimizer``, ``betas``, ``update_proj_gap``, ``qlora_compute_dtype``); its CLI flag is the key with
dashes unless declared (``--flora-projection``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Any

from velora.core.config import VeLoRAConfig
from velora.methods.common import ConfigBase, OptimizerSettings, check_int

# flat keys that are MethodOptions attributes themselves, not inside a method's config
TOP_LEVEL_KEYS = ("seed", "accumulation_steps", "velora")

# section name -> config class, in registration order; "optim" (OptimizerSettings) is every method's
_SECTIONS: dict[str, type[ConfigBase]] = {OptimizerSettings.section: OptimizerSettings}


def register_section(cls: type[ConfigBase]) -> None:
    """Make ``cls`` a section of MethodOptions under ``cls.section`` (idempotent for the same class)."""
    name = getattr(cls, "section", None)
    known = _SECTIONS.get(name)
    if known is cls:
        return
    if known is not None or name in TOP_LEVEL_KEYS or not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"{cls.__name__}.section={name!r} is taken or not a name; give it a section of its own")
    _SECTIONS[name] = cls
    option_keys.cache_clear()


def sections() -> dict[str, type[ConfigBase]]:
    """Section name -> config class of every registered method config (and ``optim``)."""
    return dict(_SECTIONS)


def default_velora() -> VeLoRAConfig:
    return VeLoRAConfig(sub_token_size=32, target_modules="paper")


class MethodOptions:
    """Everything a method reads: the shared optimizer settings (``optim``), the VeLoRA config, each registered
    method's config (``options.<section>``, its defaults unless given), the seed (projections) and the
    accumulation steps. Each method reads its own section. ``replace(**changes)`` gives a changed copy."""

    def __init__(self, optim: OptimizerSettings | None = None, velora: VeLoRAConfig | None = None, seed: int = 0,
                 accumulation_steps: int = 1, **configs: ConfigBase):
        unknown = sorted(set(configs) - set(_SECTIONS))
        if unknown:
            raise TypeError(f"MethodOptions got unknown section(s) {unknown}; the sections are {sorted(_SECTIONS)}")
        values = {"optim": optim or OptimizerSettings(), **configs}
        self.configs = {name: values.get(name) or cls() for name, cls in _SECTIONS.items()}
        self.velora = default_velora() if velora is None else velora
        self.seed, self.accumulation_steps = seed, accumulation_steps
        for name, cls in {**_SECTIONS, "velora": VeLoRAConfig}.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise TypeError(f"MethodOptions.{name} must be a {cls.__name__}, got {type(value).__name__}")
        check_int("seed", self.seed, 0)
        check_int("accumulation_steps", self.accumulation_steps)

    def __getattr__(self, name: str) -> Any:  # options.optim, options.flora, ...: the sections
        configs = self.__dict__.get("configs", {})
        if name in configs:
            return configs[name]
        raise AttributeError(f"MethodOptions has no {name!r}; its sections are {sorted(configs)}")

    def _values(self) -> dict[str, Any]:
        return {**self.configs, "velora": self.velora, "seed": self.seed,
                "accumulation_steps": self.accumulation_steps}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodOptions) and self._values() == other._values()

    def __repr__(self) -> str:
        return "MethodOptions(" + ", ".join(f"{k}={v!r}" for k, v in self._values().items()) + ")"

    def replace(self, **changes: Any) -> MethodOptions:
        return MethodOptions(**{**self._values(), **changes})

    @classmethod
    def from_flat(cls, values: dict[str, Any] | None = None, base: MethodOptions | None = None) -> MethodOptions:
        """Options from flat keys (``{"lr": 1e-2, "flora_rank": 4, "velora": VeLoRAConfig(...)}``) over ``base``
        (default: the defaults). One-line error naming the accepted keys for an unknown key."""
        values, keys = dict(values or {}), option_keys()
        unknown = sorted(set(values) - set(keys) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise ValueError(f"unknown method option(s) {unknown}; known: {known_keys()}")
        base = base or cls()
        changes: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            if key in keys:
                spec = keys[key]
                changes.setdefault(spec.section, {})[spec.field] = value
        top = {key: values[key] for key in TOP_LEVEL_KEYS if key in values}
        if isinstance(top.get("velora"), dict):
            top["velora"] = VeLoRAConfig.from_dict(top["velora"])
        section_values = {name: replace(getattr(base, name), **change) for name, change in changes.items()}
        return base.replace(**section_values, **top)

    def to_flat(self) -> dict[str, Any]:
        """Every flat key -> its value (JSON-ready except ``velora``, a VeLoRAConfig)."""
        flat = {key: getattr(getattr(self, spec.section), spec.field) for key, spec in option_keys().items()}
        flat = {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}
        return {**flat, "seed": self.seed, "accumulation_steps": self.accumulation_steps, "velora": self.velora}


@dataclass(frozen=True)
class OptionKey:
    """One flat option: where it lives (section, field) and how the CLI spells it."""

    key: str
    section: str
    field: str
    flag: str
    help: str
    kind: type | None
    choices: dict[str, Any] | None
    default: Any


def _kind(default: Any) -> type | None:
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float, str)):
        return type(default)
    return None


@functools.cache
def option_keys() -> dict[str, OptionKey]:
    """Flat key -> OptionKey for every field of every registered section (recomputed when one registers)."""
    keys: dict[str, OptionKey] = {}
    for section, cls in _SECTIONS.items():
        defaults = cls()
        for f in fields(cls):
            meta = f.metadata
            key = meta.get("key") or f"{cls.prefix}_{f.name}"
            if key in keys or key in TOP_LEVEL_KEYS:
                raise ValueError(f"option key {key!r} of {cls.__name__} is taken; declare another with option(key=)")
            flag = meta.get("flag")
            flag = "--" + key.replace("_", "-") if flag is None else flag
            default = getattr(defaults, f.name)
            kind = meta.get("kind") or _kind(default)
            keys[key] = OptionKey(key, section, f.name, flag, meta.get("help", ""), kind, meta.get("choices"),
                                  default)
    return keys


def __getattr__(name: str) -> Any:
    """``SECTIONS`` and ``OPTION_KEYS`` as of now: methods register their sections when they are imported."""
    if name == "SECTIONS":
        return sections()
    if name == "OPTION_KEYS":
        return option_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def known_keys() -> list[str]:
    return sorted([*option_keys(), *TOP_LEVEL_KEYS])


# ---- CLI ---------------------------------------------------------------------------------------------


def add_option_flags(group, skip: tuple[str, ...] = ()) -> None:
    """One argparse flag per option with a flag (but the keys in ``skip``); every default is None so only flags
    the user passes are forwarded (``options_from_flags``). Booleans get --x / --no-x; word choices and
    (BETA1 BETA2) as declared."""
    import argparse

    for spec in option_keys().values():
        if not spec.flag or spec.key in skip:
            continue
        dest = spec.key
        if spec.choices:  # checked in options_from_flags, with a one-line error
            group.add_argument(spec.flag, dest=dest, default=None, metavar="{" + ",".join(spec.choices) + "}",
                               help=spec.help)
        elif spec.kind is bool:
            group.add_argument(spec.flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=spec.help)
        elif isinstance(spec.default, tuple):
            group.add_argument(spec.flag, dest=dest, type=float, nargs=len(spec.default), default=None,
                               metavar=tuple(f"{spec.field.upper()}[{i}]" for i in range(len(spec.default))),
                               help=spec.help)
        else:
            group.add_argument(spec.flag, dest=dest, type=spec.kind, default=None, help=spec.help)


def options_from_flags(args, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Flat options of the flags the user passed (argparse namespace from ``add_option_flags``)."""
    options = {}
    for spec in option_keys().values():
        value = getattr(args, spec.key, None) if spec.flag and spec.key not in skip else None
        if value is None:
            continue
        if spec.choices and value not in spec.choices:
            raise ValueError(f"{spec.flag}={value!r} is not one of {list(spec.choices)}")
        options[spec.key] = spec.choices[value] if spec.choices else value
    return options
