"""Search spaces: YAML files that name ``TrainConfig`` fields by dotted path and give each a distribution.

A space file has three top-level keys (``byol.yaml`` shows a full example)::

    description: what the sweep is for
    fixed:                       # constants applied to every trial
      method: byol
    params:                      # searched, in this order (define-by-run)
      optim.lr: {loguniform: [3.0e-4, 1.0e-2]}
      optim.batch_size: {choice: [64, 128, 256]}
      swav.epsilon: {loguniform: [0.01, 0.1], when: {method: swav}}

Kinds: ``uniform: [low, high]``, ``loguniform: [low, high]`` (low > 0), ``int: [low, high]`` (inclusive) and
``choice: [v1, v2, ...]`` (any values the field accepts, lists included). ``when`` makes a parameter conditional:
it is sampled only when the named keys, fixed or sampled above it, have those values.

Everything is checked on load against ``TrainConfig``: paths, kinds, bounds and every bound or choice applied to
the base config (plus the fixed values and the parameter's condition). Values are checked one at a time; a
combination of two searched fields that breaks a cross-field rule is caught when the trial's config is built.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import random
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import yaml

from ssl_train.config import ConfigError, TrainConfig, check_batch_fits

if TYPE_CHECKING:
    import optuna

KINDS = ("uniform", "loguniform", "int", "choice")
TOP_LEVEL_KEYS = ("description", "fixed", "params")
FORMAT_HINT = "see search_spaces/byol.yaml for the format"
# Optuna's categorical distribution only takes these; other choices (lists) go by their JSON text.
_OPTUNA_PRIMITIVES = (type(None), bool, int, float, str)


class SearchSpaceError(ValueError):
    """An invalid search space; the message reads ``<file>: <key>: <problem> (<how to fix>)``."""


def _error(source: str, key: Any, problem: str, fix: str) -> SearchSpaceError:
    return SearchSpaceError(f"{source}: {key}: {problem} ({fix})")


def _freeze(value: Any) -> Any:
    """Lists -> tuples (recursively), so choices can live in a frozen dataclass."""
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _thaw(value: Any) -> Any:
    """Tuples -> fresh lists (recursively): the form ``TrainConfig`` list fields take."""
    return [_thaw(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class Param:
    """One searched config field: a distribution over the values of ``path``, optionally conditional.

    ``choices`` holds list-valued choices as tuples; ``sample``/``suggest`` hand them back as lists.
    """

    path: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple | None = None
    when: dict[str, Any] | None = None

    def applies(self, decided: dict[str, Any]) -> bool:
        """True when every ``when`` key is already decided and has the required value."""
        return all(key in decided and decided[key] == value for key, value in (self.when or {}).items())

    def choice_values(self) -> list[Any]:
        """The choices as the config takes them (lists, not tuples), in the order the space lists them."""
        return _thaw(self.choices)

    def draw(self, rng: random.Random) -> Any:
        """One value from a plain random generator (log-uniform: uniform in log space)."""
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        if self.kind == "int":
            return rng.randint(self.low, self.high)
        return _thaw(rng.choice(self.choices))

    def suggest(self, trial: optuna.Trial) -> Any:
        """One value from an Optuna trial, under the dotted path as the parameter name."""
        if self.kind in ("uniform", "loguniform"):
            return trial.suggest_float(self.path, self.low, self.high, log=self.kind == "loguniform")
        if self.kind == "int":
            return trial.suggest_int(self.path, self.low, self.high)
        labels = self.choice_labels()
        return _thaw(self.choices[labels.index(trial.suggest_categorical(self.path, labels))])

    def choice_labels(self) -> list[Any]:
        """The choices as Optuna can store them: primitives as they are, otherwise each as JSON text."""
        if all(isinstance(choice, _OPTUNA_PRIMITIVES) for choice in self.choices):
            return list(self.choices)
        return [json.dumps(_thaw(choice)) for choice in self.choices]

    def optuna_value(self, value: Any) -> Any | None:
        """A config value as Optuna stores it for this parameter (a choice's label, a number in range), or
        None when the parameter cannot take it."""
        if self.kind == "choice":
            labels = self.choice_labels()
            label = value if value in labels else json.dumps(value)
            return label if label in labels else None
        return value if value is not None and self.low <= value <= self.high else None


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: ``fixed`` constants plus ``params`` sampled in file order."""

    name: str
    source: str
    description: str
    fixed: dict[str, Any]
    params: tuple[Param, ...]

    def __post_init__(self) -> None:
        if not self.params:
            raise _error(self.source, "params", "the space searches nothing",
                         "add at least one parameter under 'params'; constants alone belong in a config file")

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Define-by-run for Optuna (and Ray Tune's ``OptunaSearch(space=...)``): fixed + sampled values."""
        return self._decide(lambda param: param.suggest(trial))

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """The same as ``suggest`` with a plain random generator, for tests and benchmarks without Optuna."""
        return self._decide(lambda param: param.draw(rng))

    def searched_keys(self) -> list[str]:
        return [param.path for param in self.params]

    def check_batch_fits(self, base: TrainConfig, num_train_images: int) -> None:
        """Every batch size a trial can get (fixed, each choice, an int range's top; else ``base``'s) must fit
        the ``num_train_images`` SSL-train images; checked when the data is known, before any trial."""
        key = "optim.batch_size"
        sizes = [("fixed value", self.fixed[key])] if key in self.fixed else []
        for param in self.params:
            if param.path == key:
                sizes += [(param.kind, value) for value in (param.choices if param.kind == "choice" else [param.high])]
        if not sizes:
            check_batch_fits(base, num_train_images)
        for where, size in sizes:
            if size > num_train_images:
                raise _error(self.source, key, f"{where} {size} exceeds the {num_train_images} SSL-train images of "
                             "the data", "keep every batch size <= the number of SSL-train images")

    def _decide(self, pick: Callable[[Param], Any]) -> dict[str, Any]:
        values = copy.deepcopy(self.fixed)
        for param in self.params:
            if param.applies(values):
                values[param.path] = pick(param)
        return values


def builtin_spaces() -> dict[str, Path]:
    """The spaces shipped next to this module, by name (``byol``, ``swav``, ``augment``)."""
    return {path.stem: path for path in sorted(Path(__file__).parent.glob("*.yaml"))}


def load_space(name_or_path: str | Path, base: TrainConfig | None = None) -> SearchSpace:
    """Load and validate a space: a built-in name or a YAML path. Values are checked against ``base``
    (default ``TrainConfig()``) with the space's fixed values applied."""
    builtin = builtin_spaces()
    path = builtin.get(str(name_or_path)) or Path(name_or_path)
    source = str(path)
    if not path.is_file():
        raise _error(source, "file", "not found", f"give a YAML file or a built-in space: {', '.join(builtin)}")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise _error(source, "yaml", f"cannot be read as YAML: {error}", "fix the text at the place shown") from None
    return _parse(tree, source, path.stem, base or TrainConfig())


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key written twice in one mapping (plain YAML keeps the last, silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = []
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may be overridden on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
        seen.append(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


# ---------------------------------------------------------------- validation


def _parse(tree: Any, source: str, name: str, base: TrainConfig) -> SearchSpace:
    if not isinstance(tree, dict) or "params" not in tree:
        raise _error(source, "params", "the file must be a mapping with a 'params' section", FORMAT_HINT)
    unknown = [key for key in tree if key not in TOP_LEVEL_KEYS]
    if unknown:
        raise _error(source, unknown[0], "unknown top-level key", f"allowed: {', '.join(TOP_LEVEL_KEYS)}")
    description = "" if tree.get("description") is None else tree["description"]
    if not isinstance(description, str):
        raise _error(source, "description", f"must be text, got {description!r}", "write one line of text")
    known = list(base.flat())
    fixed = _mapping(tree.get("fixed"), source, "fixed")
    for key, value in fixed.items():
        _check_path(source, key, known)
        _apply(source, key, base, {key: value})
    base = _apply(source, "fixed", base, fixed)

    params: list[Param] = []
    for path, spec in _mapping(tree.get("params"), source, "params").items():
        _check_path(source, path, known)
        if path in fixed:
            raise _error(source, path, "is both fixed and searched", "keep it in one of 'fixed' or 'params'")
        params.append(_parse_param(source, path, spec, fixed, {p.path: p for p in params}, base))
    return SearchSpace(name=name, source=source, description=description, fixed=fixed, params=tuple(params))


def _mapping(raw: Any, source: str, key: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _error(source, key, f"must be a mapping of dotted config keys, got {raw!r}", FORMAT_HINT)
    return dict(raw)


def _check_path(source: str, key: Any, known: list[str]) -> None:
    if isinstance(key, str) and key in known:
        return
    close = difflib.get_close_matches(str(key), known, n=1)
    fix = f"did you mean '{close[0]}'?" if close else "name a TrainConfig field by its dotted path, e.g. optim.lr"
    raise _error(source, key, "unknown config key", fix)


def _apply(source: str, key: str, config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``config.replace(overrides)``, with the config's complaint turned into a SearchSpaceError."""
    try:
        return config.replace(overrides)
    except ConfigError as error:
        raise _error(source, key, f"the config rejects it: {error}", "change the value or bound") from None
    except OverflowError:
        raise _error(source, key, f"a number in {overrides} is too large", "use a smaller number") from None


def _field_type(path: str) -> Any:
    """The annotation of a dotted ``TrainConfig`` field, with ``Optional`` removed."""
    hint: Any = TrainConfig
    for part in path.split("."):
        hint = typing.get_type_hints(hint)[part]
    if typing.get_origin(hint) in (Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if typing.get_origin(hint) is list:
        return "a list"
    return getattr(hint, "__name__", str(hint))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return isinstance(value, float) and not math.isfinite(value)


def _parse_param(
    source: str, path: str, spec: Any, fixed: dict[str, Any], earlier: dict[str, Param], base: TrainConfig
) -> Param:
    example = "write it like {uniform: [0.1, 0.9]} or {choice: [a, b]}"
    if not isinstance(spec, dict):
        raise _error(source, path, f"must be a distribution, got {spec!r}", example)
    extra = [key for key in spec if key not in KINDS and key != "when"]
    if extra:
        raise _error(source, path, f"unknown distribution kind {extra[0]!r}",
                     f"use one of {', '.join(KINDS)}, plus an optional 'when'")
    kinds = [key for key in spec if key in KINDS]
    if len(kinds) != 1:
        raise _error(source, path, f"needs exactly one distribution kind, got {len(kinds)}", example)
    kind, raw = kinds[0], spec[kinds[0]]
    when = _parse_when(source, path, spec.get("when"), fixed, earlier)
    context = _apply(source, path, base, when or {})

    hint = _field_type(path)
    if kind == "choice":
        return Param(path, kind, choices=_parse_choices(source, path, raw, hint, context), when=when)
    if hint is not float and not (kind == "int" and hint is int):
        fix = "use int: [low, high] or choice: [...]" if hint is int else "use choice: [...]"
        gives = "integers" if kind == "int" else "floats"
        raise _error(source, path, f"'{kind}' gives {gives}, but the field holds {_describe(hint)}", fix)
    low, high = _parse_bounds(source, path, kind, raw)
    for bound in (low, high):
        _apply(source, path, context, {path: bound})
    if kind != "int":
        low, high = float(low), float(high)
    return Param(path, kind, low=low, high=high, when=when)


def _parse_bounds(source: str, path: str, kind: str, raw: Any) -> tuple[Any, Any]:
    if not (isinstance(raw, list) and len(raw) == 2 and all(_is_number(v) for v in raw)) or _has_non_finite(raw):
        raise _error(source, path, f"{kind} bounds must be two finite numbers, got {raw!r}",
                     f"write {kind}: [low, high]")
    low, high = raw
    if kind == "int" and not all(isinstance(v, int) for v in raw):
        raise _error(source, path, f"int bounds must be integers, got {raw!r}", "write e.g. int: [10, 100]")
    if low >= high:
        raise _error(source, path, f"low {low} must be below high {high}",
                     "put the smaller bound first; a constant belongs under 'fixed'")
    if kind == "loguniform" and low <= 0:
        raise _error(source, path, f"loguniform needs low > 0, got {low}", "use a positive low, or uniform")
    return low, high


def _parse_choices(source: str, path: str, raw: Any, hint: Any, context: TrainConfig) -> tuple:
    if not isinstance(raw, list) or not raw:
        raise _error(source, path, f"choice needs a non-empty list of values, got {raw!r}", "write choice: [a, b]")
    for i, choice in enumerate(raw):
        if choice in raw[:i]:
            raise _error(source, path, f"choice {choice!r} is listed twice", "list each value once")
        if _has_non_finite(choice):
            raise _error(source, path, f"choice {choice!r} is not a finite number", "use finite numbers")
    fix = "a list field takes a list of lists, e.g. choice: [[0.08, 1.0], [0.2, 1.0]]"
    for choice in raw:
        try:
            context.replace({path: choice})
        except ConfigError as error:
            hint_text = fix if typing.get_origin(hint) is list and not isinstance(choice, list) else "change the value"
            raise _error(source, path, f"the config rejects choice {choice!r}: {error}", hint_text) from None
        except OverflowError:
            raise _error(source, path, f"choice {choice!r} is too large", "use a smaller number") from None
    return tuple(_freeze(choice) for choice in raw)


def _parse_when(
    source: str, path: str, raw: Any, fixed: dict[str, Any], earlier: dict[str, Param]
) -> dict[str, Any] | None:
    """``when: {key: value}``: each key fixed, or a choice/int parameter listed above this one."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise _error(source, path, f"'when' must map keys to values, got {raw!r}", "write e.g. when: {method: swav}")
    for key, value in raw.items():
        never = f"the condition {key}={value!r} can never hold"
        if isinstance(key, str) and key in fixed:
            if fixed[key] != value:
                raise _error(source, path, f"{never}: {key} is fixed to {fixed[key]!r}", "fix or drop the condition")
        elif isinstance(key, str) and key in earlier:
            param = earlier[key]
            if param.kind == "choice":
                if value not in param.choice_values():
                    raise _error(source, path, f"{never}: {key} chooses from {param.choice_values()}",
                                 "use one of those values")
            elif param.kind == "int":
                if not (isinstance(value, int) and not isinstance(value, bool) and param.low <= value <= param.high):
                    raise _error(source, path, f"{never}: {key} is an int in [{param.low}, {param.high}]",
                                 "use an integer in that range")
            else:
                raise _error(source, path, f"the condition is on {key}, a continuous parameter",
                             "condition on fixed keys or on choice/int parameters")
        else:
            raise _error(source, path, f"'when' refers to {key!r}, which is neither fixed nor an earlier parameter",
                         "list the parameter it depends on above this one, or fix the key")
    return dict(raw)
