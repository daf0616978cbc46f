"""It learns (the short CI form of bench/learns.py): default BYOL and SwAV beat random init, without collapse.

On digits the random-init small CNN is already a fair kNN feature extractor (~0.69 at 32px), and both
methods first dip below it, then pass it within their default 20 epochs. Both train on that schedule: a shortened
one is at the mercy of the seed (BYOL at 10 epochs ended at 0.63 / 0.69 / 0.56 for seeds 0-2 with the batched
augmentation, 0.69 / 0.54 for seeds 0 and 2 with the per-sample one; at 20 epochs seed 0 ends at 0.75).
SwAV's codes sharpen late: at 20 epochs its val kNN ends only slightly above random init (0.627 against 0.611
for seed 0), within the seed-to-seed spread, so for SwAV the test asks for "above random init" and a rise of
0.02 over its first epoch, and BYOL's 0.02 margin over random init is not required of it.
"""

import pytest

from ssl_train.config import load_config
from ssl_train.data import load_splits
from ssl_train.evaluation.evaluate import evaluate_backbone
from ssl_train.status import Status
from ssl_train.training.loop import build_model, train_loop

MARGIN_OVER_RANDOM_INIT = {"byol": 0.02, "swav": 0.0}


@pytest.fixture(scope="module")
def digits():
    return load_splits(load_config().data)


@pytest.mark.parametrize("method", ["byol", "swav"])
def test_default_training_raises_knn_accuracy_without_collapse(digits, method):
    config = load_config(overrides=[f"method={method}"])  # the default schedule, 20 epochs
    random_init = evaluate_backbone(build_model(config).backbone, digits, config.eval)["val_knn_acc"]
    result = train_loop(config, lambda metrics, checkpoint: None, splits=digits)

    assert result.status == Status.FINISHED
    knn = [epoch["val_knn_acc"] for epoch in result.history]
    assert knn[-1] > random_init + MARGIN_OVER_RANDOM_INIT[method] and knn[-1] > knn[0] + 0.02, (random_init, knn)
    assert min(epoch["embedding_std"] for epoch in result.history) > 0.5  # collapsed reads ~0, spread ~1
