"""What a checkpoint family is: how to recognise it, its key table, and its config <-> recipe maps."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CheckpointError
from ..recipe import MAX_LAYERS, Recipe
from .keymap import KeyMap

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Family:
    """name: shown in messages. matches(config, shapes): does a checkpoint belong here. to_recipe(config,
    shapes): the recipe it needs. to_config(recipe): the config.json to save, or None if this family only
    loads. keys: our state-dict keys <-> the checkpoint's."""

    name: str
    keys: KeyMap
    matches: Callable[[dict, Shapes], bool]
    to_recipe: Callable[[dict, Shapes], Recipe]
    to_config: Callable[[Recipe], dict] | None = None


def dt_limit(config: dict) -> tuple[float, float]:
    """time_step_limit as floats; transformers 5 writes infinity as {"__float__": "Infinity"}."""
    low, high = config.get("time_step_limit", (0.0, math.inf))
    return tuple(float(v["__float__"]) if isinstance(v, dict) else float(v) for v in (low, high))


def refuse_unsupported(config: dict, family: str, **supported) -> None:
    """Stop on a config value this library does not implement (rather than load a different model)."""
    for key, allowed in supported.items():
        value = config.get(key, allowed[0])
        if value not in allowed:
            raise CheckpointError(f"{family} config.json: {key}={value!r} is not supported (supported: {allowed})")


def limit_entry(limit: tuple[float, float]) -> dict:
    """time_step_limit for a config.json, left out when it is the default (0, inf): infinity is no JSON."""
    return {} if tuple(limit) == (0.0, math.inf) else {"time_step_limit": list(limit)}


def require(config: dict, key: str, family: str):
    if key not in config:
        raise CheckpointError(f"{family} config.json has no {key!r}")
    return config[key]


def size(config: dict, key: str, family: str, default: int | None = None, limit: int | None = None) -> int:
    """A positive integer field (a width, a count, a divisor) of at most ``limit``; required when there is no
    default."""
    value = require(config, key, family) if default is None else config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{family} config.json: {key} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise CheckpointError(f"{family} config.json: {key}={value} is more than the limit {limit}")
    return value


def layer_count(config: dict, key: str, family: str) -> int:
    """The number of layers, at most the recipes' MAX_LAYERS (checked before a per-layer list is built)."""
    return size(config, key, family, limit=MAX_LAYERS)


def mapping(config: dict, key: str, family: str) -> dict:
    """An optional object field ({} when absent or null)."""
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{family} config.json: {key} must be an object, got {type(value).__name__} {value!r}")
    return value


def check_config(name: str, config_value, weights_value, where: str) -> None:
    """A value stated in config.json must agree with what the weights show."""
    if config_value is not None and config_value != weights_value:
        raise CheckpointError(
            f"config/weights disagreement: config.json says {name}={config_value}, but {where} implies "
            f"{name}={weights_value}"
        )


def shape_of(shapes: Shapes, key: str, family: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{family} checkpoint has no tensor {key!r}")
    return shapes[key]


def mixer_kinds(recipe: Recipe) -> set[str]:
    return {recipe.mixers[name].kind for name in recipe.layers}


def used_specs(recipe: Recipe, kind: str) -> list:
    """The distinct mixer specs of ``kind`` that the recipe's layers use (equal specs counted once)."""
    specs: list = []
    for name in dict.fromkeys(recipe.layers):
        spec = recipe.mixers[name]
        if spec.kind == kind and spec not in specs:
            specs.append(spec)
    return specs
