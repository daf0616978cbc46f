"""It learns (the short CI form of bench/learns.py): default BYOL and SwAV rise over their first epoch, end near or
above the random-init backbone, and do not collapse.

Each bar sits below the spread that bench/learning_bars.py measured (bench/RESULTS.md, "Learning bars"): the default
config on digits, 20 epochs, seeds 0-4, each in float32 and in bf16 autocast, 10 runs a method. A CPU's arithmetic
moves a run like a change of seed does (a run in emulated bf16 once missed a bar set from one run by one val image,
0.0001), so the bars hold for all 10 and the test keeps seed 0:

| margin | BYOL min (median) | bar | SwAV min (median) | bar |
| --- | --- | --- | --- | --- |
| last epoch - first epoch | 0.020 (0.060) | 0.01 | 0.083 (0.131) | 0.05 |
| last epoch - random init | -0.024 (0.048) | -0.05 | 0.008 (0.050) | -0.02 |
| lowest embedding std x sqrt(d) | 0.72 (0.74) | 0.5 | 0.40 (0.57) | 0.3 |

On digits the random-init small CNN is already a fair kNN feature extractor (0.81-0.85 on val), so 20 epochs end
near it, above it in 9 runs of 10 for BYOL and 10 of 10 for SwAV; what the test asks of both is the rise over the first
epoch, without collapse (collapsed reads ~0, spread ~1).
"""

import pytest

from ssl_train.config import load_config
from ssl_train.data import load_splits
from ssl_train.evaluation.evaluate import evaluate_backbone
from ssl_train.status import Status
from ssl_train.training.loop import build_model, train_loop

# (last - first, last - random init, lowest embedding std): below the 10-run spread in the docstring's table
BARS = {"byol": (0.01, -0.05, 0.5), "swav": (0.05, -0.02, 0.3)}


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
    rise, over_random_init, std_floor = BARS[method]
    assert knn[-1] - knn[0] >= rise and knn[-1] - random_init >= over_random_init, (random_init, knn)
    assert min(epoch["embedding_std"] for epoch in result.history) > std_floor
