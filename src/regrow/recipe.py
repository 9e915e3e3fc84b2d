"""Recipes: a run's every option in one YAML file.

``regrow train --recipe run.yaml`` reads the options from the file; flags given on the command line win over it,
and ``--opt`` flags add to (or override) the recipe's ``opt`` mapping. Every run writes the options it ran with,
resolved, as ``recipe.yaml`` in its folder, so ``regrow train --recipe RUN/recipe.yaml --out AGAIN`` repeats it
exactly. Keys are the long option names of ``regrow train`` (``batch-size`` or ``batch_size``); ``opt`` is a
mapping of method options. Output-folder options (``out``, ``resume``, ``overwrite``) are not part of a recipe.
A recipe regrow wrote (its first line is the header below) lists every method option the run had; one it lacks
was added to regrow later, and the recipe gets the value runs had before it (the method's ``added_options``), so that
it still repeats its run after such an option arrives with another default.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .artifacts import RECIPE  # noqa: F401  (the file name, re-exported)
from .checkpoint import atomic_write
from .errors import ConfigError

NOT_IN_RECIPES = {"out", "resume", "overwrite", "recipe", "no_progress", "command", "threads"}
_HEADER = "# regrow train --recipe this-file --out FOLDER repeats the run that wrote it\n"


def recipe_from_config(config, method_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``regrow train`` options that give ``config`` (a :class:`regrow.training.TrainConfig`); the method
    options it does not give are written from ``method_defaults`` (resolved, so that the recipe still repeats the
    run when a default changes, as IEE's ``never_active`` did)."""
    c = config
    recipe: dict[str, Any] = {"model": c.model, "dataset": c.dataset, "method": c.method}
    if c.method != "dense" and c.structure != "channel":  # the CLI refuses what those would ignore
        recipe.update(sparsity=c.sparsity, distribution=c.distribution)
    if c.method != "dense":
        recipe["opt"] = {**dict(c.method_options),
                         **{k: v for k, v in (method_defaults or {}).items() if k not in c.method_options}}
    recipe.update(
        structure=c.structure, latency_target=c.latency_target, cost=c.cost, latency_batch=c.latency_batch,
        init_from=c.init_from, dense_first=c.dense_first, dense_last=c.dense_last, epochs=c.epochs,
        max_steps=c.max_steps, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum, no_nesterov=not c.nesterov,
        weight_decay=c.weight_decay, warmup_epochs=c.warmup_epochs, label_smoothing=c.label_smoothing,
        no_augment=not c.augment, channels_last=c.channels_last, device=c.device, amp=c.amp, compile=c.compile,
        train_subset=c.train_subset, synthetic_size=c.synthetic_size, seed=c.seed, data_dir=c.data_dir,
        log_every=c.log_every, eval_every=c.eval_every, checkpoint_every=c.checkpoint_every)
    return recipe


def write_recipe(path: str | os.PathLike, config, method_defaults: dict[str, Any] | None = None) -> None:
    import yaml

    text = _HEADER + yaml.safe_dump(recipe_from_config(config, method_defaults), sort_keys=False, allow_unicode=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_recipe(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The recipe at ``path`` as ``parser`` defaults: keys checked against its options, values against their
    types and choices, so that a wrong recipe is one line before any work starts."""
    import yaml

    try:
        with open(path) as f:
            text = f.read()
        data = yaml.safe_load(text)
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        raise ConfigError(f"recipe {path} is not valid YAML" + (f" (line {where.line + 1})" if where else "")
                          ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of option: value, not a {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in NOT_IN_RECIPES and a.dest != "help"}
    defaults: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in actions:
            raise ConfigError(f"recipe {path}: unknown option {raw_key!r}; known: {', '.join(sorted(actions))}")
        defaults[key] = _check_value(path, key, value, actions[key])
    if text.startswith(_HEADER) and defaults.get("opt"):
        # written by regrow, every method option resolved: an option it lacks did not exist yet, the run ran without it
        given = dict(defaults["opt"])
        defaults["opt"] += [(k, v) for k, v in _added_options(data.get("method"), data.get("structure")).items()
                            if k not in given]
    return defaults


def _added_options(method: Any, structure: Any) -> dict[str, Any]:
    """The options ``method`` gained later with a new default, and what runs before them did (its ``added_options``)."""
    from .methods import lookup

    cls = lookup(method, "channel" if structure == "channel" else "weight") if isinstance(method, str) else None
    return dict(cls.added_options) if cls is not None else {}


def _check_value(path, key: str, value: Any, action: argparse.Action) -> Any:
    what = f"recipe {path}: {key}"
    if key == "opt":
        if value is None:
            return []
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{what} must be a mapping of method option: value")
        return [(k, v) for k, v in value.items()]
    if value is None:
        if action.default is not None:
            raise ConfigError(f"{what} cannot be empty (default {action.default!r})")
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {value!r}")
        return value
    kind = action.type or str
    if kind is str and not isinstance(value, str):  # YAML 1.1 reads 2:4 as the number 124
        raise ConfigError(f"{what} must be a string, got {value!r} (quote it: {key}: '...')")
    if kind in (int, float) and isinstance(value, bool) or kind is int and isinstance(value, float):
        raise ConfigError(f"{what} must be {'an integer' if kind is int else kind.__name__}, got {value!r}")
    try:
        value = kind(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        expected = "an integer" if kind is int else getattr(kind, "description", kind.__name__)
        raise ConfigError(f"{what} must be {expected}, got {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{what} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value
