"""Images that are not independent: grouped splits (data.group_by) and the leak check (ssl_train/data/leaks.py).

The data: overlapping 16 px crops of a few source "photos" per class (bench/overlapping_crops.py), laid out
``class_<k>/<group>/<group>_<i>.png``. A random split puts crops of one photo on both sides.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_sample_images

from bench.leak_calibration import SCENE_SIDE, Scene, gradient_scene, moon_scene, sky_scene, strip_crops
from bench.overlapping_crops import write_overlapping_crops
from ssl_train.config import ConfigError, DataConfig, load_config
from ssl_train.data import DataError, DatasetSplits, folder_to_parquet, images_to_parquet, load_splits
from ssl_train.data.leaks import LOW_DETAIL, THRESHOLD, LeakCheck, check_leaks, nearest_similarity
from tuning.tracking import MLflowSweepCallback

CLASSES, GROUPS, CROPS, SIZE = 3, 6, 20, 16
REGEX = r"regex:^(?P<group>[^_]+)_"


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """360 crops: 3 classes x 6 source photos x 20 overlapping 16 px crops."""
    return write_overlapping_crops(tmp_path_factory.mktemp("crops") / "data", CLASSES, GROUPS, CROPS, SIZE, seed=0)


def _config(path: Path | str, **fields) -> DataConfig:
    return DataConfig(**{"source": "folder", "path": str(path), "image_size": SIZE, **fields})


def _parts(splits: DatasetSplits) -> dict[str, set[str]]:
    """The groups of SSL-train (with eval-train), val and test."""
    training = set(splits.ssl_train.groups) | set(splits.eval_train.groups)
    return {"train": training, "val": set(splits.val.groups), "test": set(splits.test.groups)}


def _assert_group_split(splits: DatasetSplits) -> None:
    parts = _parts(splits)
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
    assert len(parts["train"] | parts["val"] | parts["test"]) == CLASSES * GROUPS
    for part in (splits.eval_train, splits.val, splits.test):  # stratified: every class in every split
        assert set(part.labels.tolist()) == set(range(CLASSES))


def test_random_split_of_overlapping_crops_leaks_and_a_group_split_does_not(crops):
    shuffled = load_splits(_config(crops))
    assert shuffled.leaks is not None and shuffled.leaks.rate > 0.6
    summary = shuffled.summary()
    assert "leak check: " in summary and "WARNING" in summary and "Set data.group_by" in summary

    grouped = load_splits(_config(crops, group_by="level:1"))
    _assert_group_split(grouped)
    assert grouped.leaks is not None and grouped.leaks.rate < 0.03
    assert "WARNING" not in grouped.summary()
    groups = {name: len(set(getattr(grouped, name).groups)) for name in ("ssl_train", "val", "test")}
    assert f"groups: {groups['ssl_train']} SSL-train, {groups['ssl_train']} eval-train, {groups['val']} val, " \
           f"{groups['test']} test" in grouped.summary()
    assert sum(groups.values()) == CLASSES * GROUPS
    assert len(grouped.ssl_train) + len(grouped.val) + len(grouped.test) == CLASSES * GROUPS * CROPS


def test_regex_on_file_names_groups_as_the_folder_level_does(crops, tmp_path):
    by_level = load_splits(_config(crops, group_by="level:1", leak_check=False))
    by_regex = load_splits(_config(crops, group_by=REGEX, leak_check=False))
    for part in ("ssl_train", "val", "test"):
        assert torch.equal(getattr(by_level, part).images, getattr(by_regex, part).images)
        assert list(getattr(by_level, part).groups) == list(getattr(by_regex, part).groups)
    copy = shutil.copytree(crops, tmp_path / "data")
    (copy / "class_1" / "c1g0" / "c1g0_000.png").rename(copy / "class_1" / "c1g0" / "nounderscore.png")
    with pytest.raises(DataError, match=r"'nounderscore.png'.*\^\(\?P<group>\[\^_\]\+\)_"):
        load_splits(_config(copy, group_by=REGEX))
    with pytest.raises(DataError, match="no folder at level 2"):
        load_splits(_config(copy, group_by="level:2"))


def test_parquet_groups_by_path_level_or_by_column(crops, tmp_path):
    file = tmp_path / "crops.parquet"
    folder_to_parquet(crops, file)
    folder = load_splits(_config(crops, group_by="level:1", leak_check=False))
    from_path = load_splits(DataConfig(source="parquet", path=str(file), image_size=SIZE, group_by="level:1",
                                       leak_check=False))
    table = pq.read_table(file)
    patients = [path.split("/")[1] for path in table.column("path").to_pylist()]
    with_column = tmp_path / "with_column.parquet"
    pq.write_table(table.drop(["path"]).append_column("patient_id", pa.array(patients)), with_column)
    from_column = load_splits(DataConfig(source="parquet", path=str(with_column), image_size=SIZE,
                                         group_by="column:patient_id", leak_check=False))
    for part in ("ssl_train", "val", "test"):
        for other in (from_path, from_column):
            assert torch.equal(getattr(folder, part).images, getattr(other, part).images)
            assert list(getattr(folder, part).groups) == list(getattr(other, part).groups)
    _assert_group_split(from_column)
    with pytest.raises(DataError, match=r"with_column.parquet' has no column 'patient'"):
        load_splits(DataConfig(source="parquet", path=str(with_column), group_by="column:patient"))
    with pytest.raises(DataError, match=r"with_column.parquet' has no column 'path'"):
        load_splits(DataConfig(source="parquet", path=str(with_column), group_by="level:1"))
    # images_to_parquet carries the groups of an ImageSet as a 'group' column.
    written = images_to_parquet(from_column.test, tmp_path / "test.parquet")
    assert sorted(pq.read_table(written).column("group").to_pylist()) == sorted(from_column.test.groups)


def test_a_class_with_too_few_groups_is_an_error_naming_it_and_the_fix(crops, tmp_path):
    copy = shutil.copytree(crops, tmp_path / "data")
    for group in ("c2g2", "c2g3", "c2g4", "c2g5"):
        shutil.rmtree(copy / "class_2" / group)  # class_2 keeps 2 source photos
    with pytest.raises(DataError, match=r"class 'class_2' has 2 group\(s\).*at least 3.*Fix: add images from more"):
        load_splits(_config(copy, group_by="level:1"))
    shutil.copytree(crops / "class_2" / "c2g2", copy / "class_2" / "c2g2")  # 3 groups: one per split
    splits = load_splits(_config(copy, group_by="level:1", leak_check=False))
    assert all(set(part.labels.tolist()) == {0, 1, 2} for part in (splits.ssl_train, splits.val, splits.test))
    # A val fraction of 0.1 holds out 1 of 10 group folds: no fold can hold every class.
    with pytest.raises(DataError, match=r"val split by group.*has \d group.*data.val_fraction=0.1 holds out 1 of 10"):
        load_splits(_config(copy, group_by="level:1", val_fraction=0.1))


def test_unlabeled_images_of_val_or_test_groups_are_kept_out_of_ssl_train(crops, tmp_path):
    flat = tmp_path / "unlabeled"
    flat.mkdir()
    for file in sorted(crops.rglob("*.png"))[::2]:  # half the crops, every group, no class folders
        shutil.copy(file, flat / file.name)
    config = _config(flat, labeled_path=str(crops), group_by=REGEX)
    splits = load_splits(config)
    _assert_group_split(splits)
    held = set(splits.val.groups) | set(splits.test.groups)
    assert not held & set(splits.ssl_train.groups) and (splits.ssl_train.labels == -1).all()
    dropped = CLASSES * GROUPS * CROPS // 2 - len(splits.ssl_train)
    assert dropped > 0 and f"{dropped} data.path images left out of SSL-train" in splits.summary()
    assert splits.leaks is not None and splits.leaks.rate < 0.03
    ungrouped = load_splits(_config(flat, labeled_path=str(crops)))
    assert len(ungrouped.ssl_train) == CLASSES * GROUPS * CROPS // 2 and ungrouped.leaks.rate > 0.6


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.source=folder", "data.path=x", "data.group_by=level"], "group_by='level' is invalid; write level:N"),
        (["data.source=folder", "data.path=x", "data.group_by=level:a"], "the level must be an integer"),
        (["data.source=folder", "data.path=x", "data.group_by=regex:(a"], "does not compile"),
        (["data.source=folder", "data.path=x", "data.group_by=regex:^a"], "needs a named group 'group'"),
        (["data.source=folder", "data.path=x", "data.group_by=column:id"], "column:NAME reads a Parquet column"),
        (["data.group_by=level:1"], "data.group_by='level:1' is invalid; groups are read from folders and Parquet"),
        (["data.source=parquet", "data.path=x", "data.labeled_path=y", "data.streaming=true",
          "data.group_by=column:id"], "data.group_by='column:id' is invalid; grouped splits need the SSL-train images"),
    ],
    ids=["no-colon", "level-text", "bad-regex", "regex-no-group", "column-on-folder", "digits", "streaming"],
)
def test_invalid_group_by_is_a_config_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(overrides=overrides)
    assert load_config(overrides=["data.source=parquet", "data.path=x", "data.group_by=column:id"]).data.group_by


def test_leak_check_finds_shifted_copies_of_photo_crops_and_not_other_crops():
    china, flower = load_sample_images().images
    photo = torch.from_numpy(np.array(china)).permute(2, 0, 1)
    spots = [(y, x) for y in range(40, 380, 64) for x in range(40, 580, 96)]  # 36 regions 64+ px apart
    crops = torch.stack([photo[:, y : y + 32, x : x + 32] for y, x in spots])
    shifted = torch.stack([photo[:, y + 2 : y + 34, x - 3 : x + 29] for y, x in spots])  # 2 px down, 3 px left
    other = torch.from_numpy(np.array(flower)).permute(2, 0, 1)
    others = torch.stack([other[:, y : y + 32, x : x + 32] for y, x in spots])
    assert (nearest_similarity(shifted, crops)[0] >= THRESHOLD).float().mean() >= 0.9
    assert (nearest_similarity(others, crops)[0] >= THRESHOLD).float().mean() <= 0.05
    assert torch.allclose(nearest_similarity(crops[:5], crops)[0], torch.ones(5))
    assert (nearest_similarity(shifted[:6], crops)[1] >= LOW_DETAIL).all()  # the top row is sky: not judged
    check = check_leaks(shifted[24:], others[:10], crops)  # the bottom 2 rows: buildings and trees
    assert check.val_checked == 12 and check.val_low_detail == 0 and check.val_flagged >= 11
    assert check.test_checked + check.test_low_detail == 10 and check.test_flagged <= 1
    assert check.rate == (check.val_flagged + check.test_flagged) / (check.val_checked + check.test_checked)


def test_with_group_by_the_warning_explains_a_cross_group_rate_instead_of_asking_for_group_by(crops, tmp_path):
    random = LeakCheck(val_flagged=20, val_checked=100, test_flagged=0, test_checked=0, total=100)
    grouped = LeakCheck(val_flagged=20, val_checked=100, test_flagged=0, test_checked=0, total=100, group_by="level:1")
    assert "Set data.group_by" in random.warning()
    warning = grouped.warning()
    assert "Set data.group_by" not in warning and "data.group_by='level:1'" in warning
    assert "other groups" in warning and "do not capture" in warning and "repetitive" in warning
    # Every source photo filed under a second group name: its near-copies cross the groups, and are caught.
    copy = shutil.copytree(crops, tmp_path / "data")
    for group in sorted(copy.glob("class_*/*")):
        shutil.copytree(group, group.with_name(group.name + "twin"))
    splits = load_splits(_config(copy, group_by="level:1"))
    assert splits.leaks.rate > 0.2 and splits.leaks.group_by == "level:1"
    summary = splits.summary()
    assert "WARNING" in summary and "other groups (data.group_by='level:1')" in summary
    assert "Set data.group_by" not in summary


def _strips(make: Scene, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crops of 2 generated scenes in 8 strips (groups): those of strips 0-1 (val/test groups), their copies shifted
    2 px, and those of strips 2-7 (training groups)."""
    parts = [strip_crops(make(rng, SCENE_SIDE), rng, per_strip=6) for _ in range(2)]
    return (torch.cat([crops[:2].flatten(0, 1) for crops, _ in parts]),
            torch.cat([shifted[:2].flatten(0, 1) for _, shifted in parts]),
            torch.cat([crops[2:].flatten(0, 1) for crops, _ in parts]))


def test_low_detail_look_alikes_of_other_groups_are_set_apart_and_copies_across_groups_still_caught():
    rng = np.random.default_rng(0)
    (sky, _, sky_rest), (gradient, _, gradient_rest) = (_strips(make, rng) for make in (sky_scene, gradient_scene))
    training = torch.cat([sky_rest, gradient_rest])
    before, _ = nearest_similarity(torch.cat([sky, gradient]), training)
    assert (before >= THRESHOLD).float().mean() > 0.3  # the threshold alone flags these distinct images
    check = check_leaks(sky, gradient, training, group_by="level:1")
    assert check.val_flagged == check.test_flagged == 0 and check.rate == 0.0 and check.warning() is None
    assert check.val_low_detail == len(sky) and check.test_low_detail > 0
    assert f"not judged: {check.val_low_detail + check.test_low_detail} image(s) too low-detail" in check.describe()

    moon, copies, moon_rest = _strips(moon_scene, rng)  # smooth, but with enough detail to be judged
    assert check_leaks(moon, moon[:0], moon_rest).val_flagged == 0
    leaked = check_leaks(moon, moon[:0], torch.cat([moon_rest, copies]), group_by="level:1")
    assert leaked.val_flagged >= 0.9 * leaked.val_checked >= 0.8 * len(moon)
    assert "Set data.group_by" not in leaked.warning() and "other groups" in leaked.warning()


def test_leak_rate_is_a_metric_of_the_sweep_parent_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    callback = MLflowSweepCallback(tracking_uri=uri, sweep_name="leaky", experiment="ssl-tune-test",
                                   describe_trial=lambda trial: ({}, {}, []), sweep_tags={}, sweep_params={},
                                   sweep_metrics={"leak_rate": 0.25})
    callback.setup()
    parent = MlflowClient(uri).get_run(callback.tracker.parent_id)
    assert parent.data.metrics["leak_rate"] == 0.25
