"""``MethodOptions``: every method's config side by side, and the ONE translation between them and the flat
spellings users type — CLI flags, ``TrainConfig.options`` keys, planner ``**options`` and HF
``method_options`` dicts.

A flat key is ``<config prefix>_<field>`` (``lora_rank``, ``flora_kappa``, ``gradnorm_proj_rank``) unless the
field declares another (``optimizer``, ``betas``, ``update_proj_gap``, ``qlora_compute_dtype``); its CLI flag is
the key with dashes unless declared (``--flora-projection``). Adding a field to a method's config adds its key
and its flag; adding a method's config is one ``MethodOptions`` field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from velora.core.config import VeLoRAConfig
from velora.methods.common import ConfigBase, OptimizerSettings, check_int
from velora.methods.flora.config import FloraConfig
from velora.methods.galore.config import GaLoreConfig
from velora.methods.gradnorm_lorp.config import GradNormLoRPMethodConfig
from velora.methods.lora.config import LoRAConfig

# flat keys that are MethodOptions fields themselves, not inside a method's config
TOP_LEVEL_KEYS = ("seed", "accumulation_steps", "velora")


def default_velora() -> VeLoRAConfig:
    return VeLoRAConfig(sub_token_size=32, target_modules="paper")


@dataclass
class MethodOptions:
    """Everything a method reads: the shared optimizer settings, the VeLoRA config, each method's own config
    (one field per config: its ``SECTIONS`` entry and flat keys follow), the seed (projections) and the
    accumulation steps. Each method reads its own section."""

    optim: OptimizerSettings = field(default_factory=OptimizerSettings)
    velora: VeLoRAConfig = field(default_factory=default_velora)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    galore: GaLoreConfig = field(default_factory=GaLoreConfig)
    flora: FloraConfig = field(default_factory=FloraConfig)
    gradnorm_lorp: GradNormLoRPMethodConfig = field(default_factory=GradNormLoRPMethodConfig)
    seed: int = 0
    accumulation_steps: int = 1

    def __post_init__(self) -> None:
        for name, cls in {**SECTIONS, "velora": VeLoRAConfig}.items():  # SECTIONS: defined after this class
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise TypeError(f"MethodOptions.{name} must be a {cls.__name__}, got {type(value).__name__}")
        check_int("seed", self.seed, 0)
        check_int("accumulation_steps", self.accumulation_steps)

    @classmethod
    def from_flat(cls, values: dict[str, Any] | None = None, base: MethodOptions | None = None) -> MethodOptions:
        """Options from flat keys (``{"lr": 1e-2, "flora_rank": 4, "velora": VeLoRAConfig(...)}``) over ``base``
        (default: the defaults). One-line error naming the accepted keys for an unknown key."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(OPTION_KEYS) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise ValueError(f"unknown method option(s) {unknown}; known: {known_keys()}")
        base = base or cls()
        changes: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            if key in OPTION_KEYS:
                spec = OPTION_KEYS[key]
                changes.setdefault(spec.section, {})[spec.field] = value
        top = {key: values[key] for key in TOP_LEVEL_KEYS if key in values}
        if isinstance(top.get("velora"), dict):
            top["velora"] = VeLoRAConfig.from_dict(top["velora"])
        sections = {name: replace(getattr(base, name), **change) for name, change in changes.items()}
        return replace(base, **sections, **top)

    def to_flat(self) -> dict[str, Any]:
        """Every flat key -> its value (JSON-ready except ``velora``, a VeLoRAConfig)."""
        flat = {key: getattr(getattr(self, spec.section), spec.field) for key, spec in OPTION_KEYS.items()}
        flat = {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}
        return {**flat, "seed": self.seed, "accumulation_steps": self.accumulation_steps, "velora": self.velora}


# section of MethodOptions -> its config class: every field holding a method config (or the optimizer settings)
SECTIONS: dict[str, type[ConfigBase]] = {f.name: f.default_factory for f in fields(MethodOptions)
                                         if f.name not in TOP_LEVEL_KEYS}


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


def _option_keys() -> dict[str, OptionKey]:
    keys = {}
    for section, cls in SECTIONS.items():
        defaults = cls()
        for f in fields(cls):
            meta = f.metadata
            key = meta.get("key") or f"{cls.prefix}_{f.name}"
            flag = meta.get("flag")
            flag = "--" + key.replace("_", "-") if flag is None else flag
            default = getattr(defaults, f.name)
            kind = meta.get("kind") or _kind(default)
            keys[key] = OptionKey(key, section, f.name, flag, meta.get("help", ""), kind, meta.get("choices"),
                                  default)
    return keys


OPTION_KEYS: dict[str, OptionKey] = _option_keys()


def known_keys() -> list[str]:
    return sorted([*OPTION_KEYS, *TOP_LEVEL_KEYS])


# ---- CLI ---------------------------------------------------------------------------------------------


def add_option_flags(group, skip: tuple[str, ...] = ()) -> None:
    """One argparse flag per option with a flag (but the keys in ``skip``); every default is None so only flags
    the user passes are forwarded (``options_from_flags``). Booleans get --x / --no-x; word choices and
    (BETA1 BETA2) as declared."""
    import argparse

    for spec in OPTION_KEYS.values():
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
    for spec in OPTION_KEYS.values():
        value = getattr(args, spec.key, None) if spec.flag and spec.key not in skip else None
        if value is None:
            continue
        if spec.choices and value not in spec.choices:
            raise ValueError(f"{spec.flag}={value!r} is not one of {list(spec.choices)}")
        options[spec.key] = spec.choices[value] if spec.choices else value
    return options
