"""Search spaces: the shipped YAML files, sampling (plain and Optuna define-by-run), conditions, and load errors."""

import math
import random
import statistics
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search_spaces import Param, SearchSpace, SearchSpaceError, builtin_spaces, load_space
from ssl_train.config import TrainConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

METHOD_CHOICE_SPACE = """
description: method choice with conditional knobs
params:
  method:         {choice: [byol, swav]}
  byol.tau_base:  {uniform: [0.9, 0.999], when: {method: byol}}
  swav.epsilon:   {loguniform: [0.01, 0.1], when: {method: swav}}
  optim.lr:       {loguniform: [3.0e-4, 1.0e-2]}
"""


def write(tmp_path: Path, text: str, name: str = "my_space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_in_space(space: SearchSpace, values: dict) -> None:
    """Every value lies in its distribution, and the whole set is a valid config."""
    for key, value in space.fixed.items():
        assert values[key] == value
    for param in space.params:
        if param.path not in values:
            continue
        value = values[param.path]
        if param.kind == "choice":
            assert value in [list(c) if isinstance(c, tuple) else c for c in param.choices]
            assert not isinstance(value, tuple)
        elif param.kind == "int":
            assert isinstance(value, int) and param.low <= value <= param.high
        else:
            assert isinstance(value, float) and param.low <= value <= param.high
    TrainConfig().replace(values)


def test_builtin_spaces_are_the_four_shipped_files():
    spaces = builtin_spaces()
    assert sorted(spaces) == ["adapt", "augment", "byol", "swav"]
    assert all(path.is_file() and path.parent.name == "search_spaces" for path in spaces.values())


def test_byol_and_swav_spaces_have_the_documented_ranges():
    byol = load_space("byol")
    assert byol.fixed == {"method": "byol"} and byol.name == "byol" and byol.description
    assert byol.searched_keys() == [
        "byol.tau_base", "optim.lr", "optim.batch_size", "augment.strength", "optim.weight_decay"
    ]
    assert byol.params[0] == Param("byol.tau_base", "uniform", low=0.9, high=0.999)
    swav = load_space("swav")
    assert swav.fixed == {"method": "swav"}
    by_path = {p.path: p for p in swav.params}
    assert (by_path["swav.epsilon"].kind, by_path["swav.epsilon"].low, by_path["swav.epsilon"].high) == (
        "loguniform", 0.01, 0.1
    )
    assert by_path["swav.num_prototypes"].choices == (10, 30, 100)
    # the default config's values lie inside the searched ranges
    default = TrainConfig().flat()
    for param in byol.params + swav.params:
        if param.kind != "choice":
            assert param.low <= default[param.path] <= param.high, param.path
        else:
            assert default[param.path] in param.choices, param.path


@pytest.mark.parametrize("name", ["byol", "swav", "augment"])
def test_every_rng_and_optuna_sample_of_a_shipped_space_is_a_valid_config(name):
    space = load_space(name)
    rng = random.Random(0)
    for _ in range(100):
        values = space.sample(rng)
        assert set(values) == set(space.fixed) | set(space.searched_keys())
        assert_in_space(space, values)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        values = space.suggest(trial)
        assert set(values) == set(space.fixed) | set(space.searched_keys())
        assert_in_space(space, values)
        study.tell(trial, 0.0)


def test_loguniform_sampling_is_uniform_in_log_space():
    lr = load_space("byol").params[1]
    draws = [math.log10(lr.draw(random.Random(seed))) for seed in range(2000)]
    # log10 of U(log 3e-4, log 1e-2) has median at the log midpoint, about -2.74 (a linear-uniform draw: -2.31)
    assert statistics.median(draws) == pytest.approx((math.log10(3e-4) + math.log10(1e-2)) / 2, abs=0.05)


def test_list_valued_choices_come_back_as_fresh_lists():
    space = load_space("augment")
    crop = next(p for p in space.params if p.path == "augment.crop_scale")
    assert crop.choices[0] == (0.08, 1.0)
    assert crop.choice_labels()[0] == "[0.08, 1.0]"  # what Optuna stores
    seen = set()
    rng = random.Random(1)
    for _ in range(40):
        values = space.sample(rng)
        for key in ("augment.crop_scale", "augment.blur_p", "augment.solarize_p"):
            assert isinstance(values[key], list) and len(values[key]) == 2
        seen.add(tuple(values["augment.crop_scale"]))
        values["augment.crop_scale"].append(99.0)  # the caller owns its lists
    assert seen == {(0.08, 1.0), (0.2, 1.0), (0.4, 1.0), (0.7, 1.0)}
    trial = optuna.create_study().ask()
    values = space.suggest(trial)
    assert isinstance(values["augment.blur_p"], list)
    assert trial.params["augment.blur_p"] == str(values["augment.blur_p"])  # JSON text inside Optuna
    assert TrainConfig().replace(values).augment.blur_p == values["augment.blur_p"]


def test_conditional_param_is_sampled_only_when_its_condition_holds(tmp_path):
    space = load_space(write(tmp_path, METHOD_CHOICE_SPACE))
    assert space.params[2].when == {"method": "swav"}
    rng = random.Random(0)
    methods = []
    for _ in range(200):
        values = space.sample(rng)
        methods.append(values["method"])
        assert ("swav.epsilon" in values) == (values["method"] == "swav")
        assert ("byol.tau_base" in values) == (values["method"] == "byol")
        assert "optim.lr" in values
        assert_in_space(space, values)
    assert 60 < methods.count("swav") < 140  # both branches are taken


def test_tpe_runs_define_by_run_on_a_conditional_space(tmp_path):
    """Optuna's TPE through ``suggest``: parameter sets differ per trial, and TPE homes in on the optimum."""
    space = load_space(write(tmp_path, METHOD_CHOICE_SPACE))

    def objective(trial: optuna.Trial) -> float:
        values = space.suggest(trial)
        loss = (math.log10(values["optim.lr"]) + 2.5) ** 2
        if values["method"] == "swav":
            loss += (math.log10(values["swav.epsilon"]) + 1.3) ** 2
        else:
            loss += 1.0 + 100 * (values["byol.tau_base"] - 0.99) ** 2
        return loss

    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=8)
    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=40)
    assert len(study.trials) == 40
    for trial in study.trials:
        assert ("swav.epsilon" in trial.params) == (trial.params["method"] == "swav")
        assert isinstance(trial.distributions["optim.lr"], optuna.distributions.FloatDistribution)
        assert trial.distributions["optim.lr"].log
    startup = [t.value for t in study.trials[:8]]
    guided = [t.value for t in study.trials[-10:]]
    assert statistics.mean(guided) < statistics.mean(startup)
    assert study.best_params["method"] == "swav"  # the swav branch has the lower optimum (0 vs 1)


# ---------------------------------------------------------------- load errors

VALID_PARAM = "params:\n  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"

ERROR_CASES = {
    "not a mapping": ("- optim.lr\n- optim.batch_size\n", "params"),
    "missing params": ("description: nothing\nfixed: {method: byol}\n", "params"),
    "empty params": ("params: {}\n", "params"),
    "params not a mapping": ("params: [optim.lr]\n", "params"),
    "unknown top-level key": (VALID_PARAM + "fixd: {method: byol}\n", "fixd"),
    "description not text": (VALID_PARAM + "description: [a, b]\n", "description"),
    "unknown config path": ("params:\n  optim.lrr: {uniform: [0.1, 0.2]}\n", "optim.lrr"),
    "a section, not a field": ("params:\n  optim: {uniform: [0.1, 0.2]}\n", "optim"),
    "two kinds": ("params:\n  optim.lr: {uniform: [0.1, 0.2], loguniform: [0.1, 0.2]}\n", "optim.lr"),
    "zero kinds": ("params:\n  optim.lr: {}\n", "optim.lr"),
    "only a condition": ("fixed: {method: byol}\nparams:\n  optim.lr: {when: {method: byol}}\n", "optim.lr"),
    "unknown kind": ("params:\n  optim.lr: {normal: [0.1, 0.2]}\n", "optim.lr"),
    "spec not a mapping": ("params:\n  optim.lr: 0.1\n", "optim.lr"),
    "one bound": ("params:\n  optim.lr: {uniform: [0.1]}\n", "optim.lr"),
    "three bounds": ("params:\n  optim.lr: {uniform: [0.1, 0.2, 0.3]}\n", "optim.lr"),
    "text bound": ("params:\n  optim.lr: {uniform: [low, 0.2]}\n", "optim.lr"),
    "bool bound": ("params:\n  optim.lr: {uniform: [false, 0.2]}\n", "optim.lr"),
    "infinite bound": ("params:\n  optim.lr: {uniform: [0.1, .inf]}\n", "optim.lr"),
    "low above high": ("params:\n  optim.lr: {uniform: [0.2, 0.1]}\n", "optim.lr"),
    "low equals high": ("params:\n  optim.epochs: {int: [5, 5]}\n", "optim.epochs"),
    "loguniform from zero": ("params:\n  optim.weight_decay: {loguniform: [0, 0.1]}\n", "optim.weight_decay"),
    "loguniform negative": ("params:\n  optim.weight_decay: {loguniform: [-1.0, 0.1]}\n", "optim.weight_decay"),
    "int with float bounds": ("params:\n  optim.epochs: {int: [1.5, 10]}\n", "optim.epochs"),
    "empty choice": ("params:\n  optim.batch_size: {choice: []}\n", "optim.batch_size"),
    "choice not a list": ("params:\n  optim.batch_size: {choice: 64}\n", "optim.batch_size"),
    "duplicate choice": ("params:\n  optim.batch_size: {choice: [64, 64]}\n", "optim.batch_size"),
    "uniform on an int field": ("params:\n  optim.batch_size: {uniform: [64, 256]}\n", "optim.batch_size"),
    "uniform on a list field": ("params:\n  augment.crop_scale: {uniform: [0.1, 1.0]}\n", "augment.crop_scale"),
    "int on a method": ("params:\n  method: {int: [0, 1]}\n", "method"),
    "choice batch size 1": ("params:\n  optim.batch_size: {choice: [1, 128]}\n", "optim.batch_size"),
    "choice negative lr": ("params:\n  optim.lr: {choice: [-1, 0.1]}\n", "optim.lr"),
    "choice unknown method": ("params:\n  method: {choice: [byol, simclr]}\n", "method"),
    "choice wrong type": ("params:\n  optim.lr: {choice: [fast, 0.1]}\n", "optim.lr"),
    "flat list choice": ("params:\n  augment.crop_scale: {choice: [0.08, 1.0]}\n", "augment.crop_scale"),
    "per-view pair of three": ("params:\n  augment.blur_p: {choice: [[1.0, 0.1, 0.0]]}\n", "augment.blur_p"),
    "bound out of range": ("params:\n  byol.tau_base: {uniform: [0.9, 1.5]}\n", "byol.tau_base"),
    "negative lr bound": ("params:\n  optim.lr: {uniform: [-0.1, 0.1]}\n", "optim.lr"),
    "when on an unknown key": ("params:\n  swav.epsilon: {loguniform: [0.01, 0.1], when: {method: swav}}\n",
                               "swav.epsilon"),
    "when on a later param": ("params:\n  swav.epsilon: {loguniform: [0.01, 0.1], when: {method: swav}}\n"
                              "  method: {choice: [byol, swav]}\n", "swav.epsilon"),
    "when never holds (fixed)": ("fixed: {method: byol}\n"
                                 "params:\n  swav.epsilon: {loguniform: [0.01, 0.1], when: {method: swav}}\n",
                                 "swav.epsilon"),
    "when never holds (choice)": ("params:\n  method: {choice: [byol, swav]}\n"
                                  "  swav.epsilon: {loguniform: [0.01, 0.1], when: {method: simclr}}\n",
                                  "swav.epsilon"),
    "when on a continuous param": ("params:\n  optim.lr: {uniform: [0.001, 0.01]}\n"
                                   "  swav.epsilon: {loguniform: [0.01, 0.1], when: {optim.lr: 0.005}}\n",
                                   "swav.epsilon"),
    "when not a mapping": ("params:\n  optim.lr: {uniform: [0.001, 0.01], when: method}\n", "optim.lr"),
    "fixed and searched": ("fixed: {optim.lr: 0.01}\n" + VALID_PARAM, "optim.lr"),
    "fixed unknown key": ("fixed: {optim.batchsize: 64}\n" + VALID_PARAM, "optim.batchsize"),
    "fixed invalid value": ("fixed: {optim.batch_size: 1}\n" + VALID_PARAM, "optim.batch_size"),
    "fixed unknown method": ("fixed: {method: simclr}\n" + VALID_PARAM, "method"),
    "fixed values clash together": ("fixed: {optim.warmup_epochs: 5, optim.epochs: 4}\n" + VALID_PARAM, "fixed"),
    "fixed not a mapping": ("fixed: [method]\n" + VALID_PARAM, "fixed"),
    "duplicate YAML key": ("params:\n  optim.lr: {uniform: [0.1, 0.2]}\n  optim.lr: {uniform: [0.2, 0.3]}\n",
                           "optim.lr"),
    "invalid YAML": ("params: {optim.lr: [0.1,\n", "yaml"),
}


@pytest.mark.parametrize("text, key", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_space_names_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(SearchSpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and f"{key}" in message
    assert "(" in message and message.endswith(")")  # "<problem> (<how to fix>)"


def test_error_messages_suggest_the_fix(tmp_path):
    with pytest.raises(SearchSpaceError, match="did you mean 'optim.lr'"):
        load_space(write(tmp_path, ERROR_CASES["unknown config path"][0]))
    with pytest.raises(SearchSpaceError, match=r"use int: \[low, high\] or choice"):
        load_space(write(tmp_path, ERROR_CASES["uniform on an int field"][0]))
    with pytest.raises(SearchSpaceError, match="list of lists"):
        load_space(write(tmp_path, ERROR_CASES["flat list choice"][0]))
    with pytest.raises(SearchSpaceError, match="must be >= 2"):  # the config's own explanation is kept
        load_space(write(tmp_path, ERROR_CASES["choice batch size 1"][0]))
    with pytest.raises(SearchSpaceError, match="appears twice"):
        load_space(write(tmp_path, ERROR_CASES["duplicate YAML key"][0]))


def test_missing_file_and_empty_space_are_errors(tmp_path):
    with pytest.raises(SearchSpaceError, match="nope.yaml: file: not found.*byol, swav"):
        load_space(tmp_path / "nope.yaml")
    with pytest.raises(SearchSpaceError, match="inline: params: the space searches nothing"):
        SearchSpace(name="x", source="inline", description="", fixed={"method": "byol"}, params=())


def test_values_are_checked_against_the_given_base_config(tmp_path):
    path = write(tmp_path, "params:\n  optim.warmup_epochs: {int: [0, 5]}\n")
    assert load_space(path).params[0].high == 5
    with pytest.raises(SearchSpaceError, match="optim.warmup_epochs"):
        load_space(path, base=TrainConfig().replace({"optim.epochs": 3}))


def test_null_is_a_valid_choice_for_optional_fields(tmp_path):
    space = load_space(write(tmp_path, "params:\n  augment.jitter_p: {choice: [null, 0.0, 0.8]}\n"))
    drawn = {space.sample(random.Random(seed))["augment.jitter_p"] for seed in range(30)}
    assert drawn == {None, 0.0, 0.8}


# ---------------------------------------------------------------- property: accepted, or a SearchSpaceError

def pick(*strategies: st.SearchStrategy) -> st.SearchStrategy:
    """One of ``strategies``, each equally likely (``st.one_of`` flattens nested one_ofs into many branches)."""
    return st.sampled_from(strategies).flatmap(lambda strategy: strategy)


FIELDS = [
    "optim.lr", "optim.batch_size", "byol.tau_base", "swav.epsilon", "method", "augment.crop_scale",
    "augment.blur_p", "augment.flip_p", "augment.jitter_p",
]
PATHS = st.sampled_from(FIELDS + ["optim.lrr", "optim", "", "nonsense.key"])
PLAUSIBLE = st.sampled_from(
    ["byol", "swav", "simclr", 1, 64, 128, 0.0, 0.5, 0.05, [0.2, 1.0], [0.5, 0.5], [0.1, 0.2, 0.3]]
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4), PLAUSIBLE)
VALUES = st.one_of(SCALARS, st.lists(st.floats(-0.5, 1.5), max_size=3), st.lists(SCALARS, max_size=3))
SORTED_PAIR = st.lists(st.floats(1e-3, 1.0), min_size=2, max_size=2, unique=True).map(sorted)
BOUNDS = st.one_of(
    SORTED_PAIR,
    st.lists(st.integers(-3, 300), min_size=2, max_size=2),
    VALUES,
)
WHEN = st.one_of(VALUES, st.dictionaries(PATHS, VALUES, max_size=2), st.fixed_dictionaries({"method": PLAUSIBLE}))
ONE_KIND = st.builds(lambda kind, bounds: {kind: bounds}, st.sampled_from(["uniform", "loguniform", "int"]), BOUNDS)
SPECS = pick(
    VALUES,
    ONE_KIND,
    st.builds(lambda spec, when: {**spec, "when": when}, ONE_KIND, WHEN),
    st.builds(lambda choices: {"choice": choices}, st.lists(PLAUSIBLE, max_size=4)),
    st.builds(lambda choices, when: {"choice": choices, "when": when}, st.lists(PLAUSIBLE, max_size=3), WHEN),
    st.fixed_dictionaries({}, optional={
        "uniform": BOUNDS, "loguniform": BOUNDS, "int": BOUNDS, "choice": st.lists(VALUES, max_size=4),
        "normal": VALUES, "when": WHEN,
    }),
)
OUTLINE = st.fixed_dictionaries(  # a well-formed outline: real fields, arbitrary distributions
    {"params": st.dictionaries(st.sampled_from(FIELDS), SPECS, min_size=1, max_size=3)},
    optional={
        "description": st.text(max_size=8),
        "fixed": st.dictionaries(st.sampled_from(FIELDS), PLAUSIBLE, max_size=1),
    },
)
ANYTHING = st.one_of(VALUES, st.fixed_dictionaries({}, optional={
    "description": VALUES,
    "fixed": st.one_of(VALUES, st.dictionaries(PATHS, VALUES, max_size=3)),
    "params": st.one_of(VALUES, st.dictionaries(PATHS, SPECS, max_size=4)),
    "extra": VALUES,
}))
NEAR_VALID = st.fixed_dictionaries(  # float fields whose valid range includes [0.001, 1]: mostly accepted
    {"params": st.dictionaries(
        st.sampled_from(["optim.lr", "byol.tau_base", "swav.epsilon", "augment.flip_p", "augment.jitter_p"]),
        st.builds(lambda kind, bounds: {kind: bounds}, st.sampled_from(["uniform", "loguniform"]), SORTED_PAIR),
        min_size=1, max_size=3,
    )},
    optional={"fixed": st.fixed_dictionaries({"method": PLAUSIBLE})},
)
DOCUMENTS = pick(OUTLINE, OUTLINE, ANYTHING, NEAR_VALID)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=DOCUMENTS)
def test_any_document_is_accepted_or_raises_search_space_error(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("hyp") / "generated.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        space = load_space(path)
    except SearchSpaceError as error:
        assert str(error).startswith(f"{path}: ")
        return
    rng = random.Random(0)
    for _ in range(5):
        assert_in_space(space, space.sample(rng))
    assert_in_space(space, space.suggest(optuna.create_study().ask()))
