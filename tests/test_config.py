"""The typed config: YAML round trip, dotted overrides, and clear errors before any work."""

import dataclasses

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssl_train.config import ConfigError, TrainConfig, check_batch_fits, load_config, parse_override
from tuning.cli_args import parse_workers


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    config = load_config()
    path = config.save(tmp_path / "run.yaml")
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == config.optim.lr


def test_dotted_overrides_parse_values_as_yaml(tmp_path):
    overrides = ["optim.lr=0.05", "method=swav", "augment.blur_p=[0.5, 0.5]", "scaling.use_gpu=false"]
    config = load_config(overrides=overrides)
    assert config.optim.lr == 0.05 and isinstance(config.optim.lr, float)
    assert config.method == "swav"
    assert config.augment.blur_p == [0.5, 0.5]
    assert parse_override("byol.tau_base=0.996") == ("byol.tau_base", 0.996)
    assert load_config(overrides=["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 reads this as a string


def test_file_values_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: swav\nswav:\n  epsilon: 0.03\noptim:\n  epochs: 7\n")
    config = load_config(path, ["optim.epochs=3"])
    assert (config.method, config.swav.epsilon, config.optim.epochs) == ("swav", 0.03, 3)
    assert config.byol == TrainConfig().byol  # untouched sections keep defaults


def test_flat_keys_are_dotted_paths():
    flat = TrainConfig().flat()
    assert flat["optim.lr"] == TrainConfig().optim.lr
    assert flat["swav.epsilon"] == 0.05
    assert all(not isinstance(v, dict) for v in flat.values())


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("optim.lrr=0.1", ["optim.lrr", "allowed keys", "lr"]),
        ("optimm.lr=0.1", ["optimm", "not a section", "optim"]),
        ("optim.lr=0", ["optim.lr=0", "> 0"]),
        ("optim.lr=-1", ["optim.lr=-1"]),
        ("optim.lr=fast", ["optim.lr='fast'", "number"]),
        ("optim.batch_size=12.5", ["optim.batch_size", "integer"]),
        ("method=simclr", ["method='simclr'", "byol", "swav"]),
        ("data.image_size=4", ["data.image_size=4", "small_cnn", ">= 8"]),
        ("augment.strength=3", ["augment.strength=3", "[0, 2]"]),
        ("augment.blur_p=[0.5]", ["augment.blur_p", "2 probabilities"]),
        ("augment.crop_scale=[0.9, 0.2]", ["augment.crop_scale", "low <= high"]),
        ("scaling.max_workers=0", ["scaling.max_workers=0"]),
        ("optim.mixed_precision=1", ["optim.mixed_precision=1", "true or false"]),
        ("augment.backend=gpu", ["augment.backend='gpu'", "batched", "per_sample"]),
        ("data.loader_workers=2", ["data.loader_workers=2", "augment.backend=per_sample", "data.loader_workers=0"]),
    ],
)
def test_invalid_values_name_key_value_and_what_is_allowed(override, fragments):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override])
    for fragment in fragments:
        assert fragment in str(error.value)


def test_image_size_the_backbone_cannot_take():
    with pytest.raises(ConfigError, match="resnet18.*needs >= 32"):
        load_config(overrides=["backbone.name=resnet18", "backbone.small_image_stem=false", "data.image_size=16"])
    assert load_config(overrides=["backbone.name=resnet18", "data.image_size=16"]).data.image_size == 16


def test_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: -0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.lr=-0\.1"):
        load_config(path)
    path.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_batch_larger_than_dataset_fails_before_training():
    config = load_config(overrides=["optim.batch_size=2048"])
    with pytest.raises(ConfigError, match="optim.batch_size=2048.*only 1257 images"):
        check_batch_fits(config, 1257)
    check_batch_fits(config, 4096)


def test_workers_flag():
    assert parse_workers("2") == {"scaling.min_workers": 2, "scaling.max_workers": 2}
    assert parse_workers("1:4") == {"scaling.min_workers": 1, "scaling.max_workers": 4}
    with pytest.raises(ConfigError, match="MIN:MAX"):
        parse_workers("two")
    with pytest.raises(ConfigError, match="scaling.max_workers"):
        load_config(overrides=parse_workers("3:2"))


# ---------------------------------------------------- property: accepted, or a ConfigError naming file and key

SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(f.type)}
PLAUSIBLE = st.sampled_from(["byol", "swav", "simclr", "sgd", "resnet18", 0, 1, 2, 8, 32, 64, 0.0, 0.5, 0.99, 1e-3,
                             -1.0, [0.2, 1.0], [1.0, 0.2], [0.5], [0.5, 0.5]])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10_000), st.floats(), st.text(max_size=5), PLAUSIBLE)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))


def section_document(name: str) -> st.SearchStrategy:
    keys = st.sampled_from([f.name for f in dataclasses.fields(SECTIONS[name])] + ["typo", ""])
    return st.one_of(st.dictionaries(keys, VALUES, max_size=4), SCALARS)


TOP_KEYS = st.sampled_from([*SECTIONS, "method", "seed", "output_dir", "optimm", "lr"])
DOCUMENTS = st.one_of(
    st.lists(TOP_KEYS, max_size=4, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: section_document(k) if k in SECTIONS else VALUES for k in keys})
    ),
    SCALARS,
)
KNOWN_NAMES = {*TrainConfig().flat(), *SECTIONS, "config"}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=DOCUMENTS)
def test_any_config_file_is_accepted_or_raises_config_error_naming_file_and_key(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("hyp") / "generated.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        config = load_config(path)
    except ConfigError as error:
        message = str(error)
        assert message.startswith(f"{path}: "), message
        named = set(KNOWN_NAMES)
        if isinstance(document, dict):
            named |= {str(k) for k in document} | {
                f"{k}.{inner}" for k, v in document.items() if isinstance(v, dict) for inner in v
            }
        assert any(name and name in message for name in named), message
        return
    assert load_config(config.save(path)) == config  # what is accepted is a valid, savable config


def test_with_absolute_paths_resolves_data_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(overrides=["data.source=parquet", "data.path=data/unlabeled.parquet", "optim.lr=0.01"])
    absolute = config.with_absolute_paths()
    assert absolute.data.path == str(tmp_path / "data" / "unlabeled.parquet")  # Ray workers start elsewhere
    assert absolute.data.labeled_path is None and absolute.optim == config.optim
    assert absolute.with_absolute_paths() == absolute
