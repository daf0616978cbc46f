"""Does the search's objective rank recipes the way new images do? (issue 33, "the search's compass")

For each data set, ``--trials`` random recipes (augmentation strength, crop, flips, lr, tau, and a short or full
budget), the same recipes on every set, each trained in this process to its last epoch. Every candidate objective
is computed on the same final backbone and correlated (Spearman, Kendall, over the trials) with the truth: kNN
accuracy (k=20 fitted, T=0.07, memory the run's eval-train images) on images that no split used.

- **crops**: overlapping crops of digit-mosaic "photos", split by photo (``data.group_by=level:1``); the new
  images are whole photos set aside.
- **mnist5k**: MNIST-5k digits, no groups; the new images are digits set aside.
- **textures**: generated isotropic textures (no canonical orientation: every rotation is as likely), crops of
  each texture grouped by source; the new images are textures set aside: 40 a class, 5 crops each (with 4 a class,
  20 crops each, the truth's own reliability was 0.42 on a development draw: too few new textures to rank by).

The truth is itself measured on a sample, so its reliability is reported beside it: the Spearman between the trials'
kNN accuracy on two random halves of the new groups (images without groups), averaged over 200 halvings and stepped
up to the whole set (Spearman-Brown, 2r / (1 + r)). No objective can rank much closer to the truth than that.

Candidates with labels (val split only; the SSL model trained on none of its images):
``knn_acc`` (the old objective), ``knn_prob`` (the kNN vote's share for the true class, a proper score),
``probe_logp`` (a linear probe's mean log-probability of the true class). Without labels: ``rankme``,
``alpha_req`` (-|alpha - 1|), ``rotation`` (SelfAugment's rotation probe); and, defined here because they failed
and the library does not offer them, ``view_match`` (instance retrieval between two fixed corner views, which needs
no "up") and ``lidar`` (LiDAR, Thilak et al., ICLR 2024: the effective rank of the LDA matrix whose classes are val
images and whose samples are 10 views of each by the trial's own augmentations), CLID's two parts (Lu et al. 2022,
arXiv 2206.01251): ``cluster_learnability`` (k-means into 10 clusters on the val features; a 5-NN classifier fitted
on half the val groups predicts the clusters of the other half) and ``intrinsic_dim`` (the TwoNN estimate, Facco et
al. 2017, higher = more expressive), each alone, as a combination's weights would be fitted on the data it is scored
on; and ``silhouette`` (of those clusters, by cosine; Lowe et al. 2024 use it as a label-free proxy of clustering
quality). No candidate has a parameter fitted here: the others are scored as the library computes them, LiDAR with
the paper's constants. The val-size curve subsamples val groups (images without groups) to show how many the
labeled objective needs to rank reliably.

    python -m bench.objective_rank [--trials 24] [--write]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import stats  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import silhouette_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from bench.common import machine, markdown_table, replace_section  # noqa: E402
from bench.overlapping_crops import mosaic_photos, write_photo_crops  # noqa: E402
from ssl_train import load_config  # noqa: E402
from ssl_train.augment.batched import BatchedViews  # noqa: E402
from ssl_train.augment.recipes import view_recipes  # noqa: E402
from ssl_train.data import DatasetSplits, ImageSet, load_images, load_splits  # noqa: E402
from ssl_train.data.sources import EMBEDDED_POOLS  # noqa: E402
from ssl_train.evaluation.evaluate import evaluate_backbone  # noqa: E402
from ssl_train.evaluation.features import extract_features  # noqa: E402
from ssl_train.evaluation.knn import fitted_knn_k, knn_vote_shares, true_class_share  # noqa: E402
from ssl_train.evaluation.label_free import alpha_exponent, alpha_req_score, effective_rank  # noqa: E402
from ssl_train.evaluation.resolution import bootstrap_se  # noqa: E402
from ssl_train.evaluation.rotation import orientation_informative, rotation_probe_accuracy  # noqa: E402
from ssl_train.training.loop import Trainer, WorkerContext, build_model  # noqa: E402
from tuning.cli_args import DEMO_SCALE  # noqa: E402

K, TEMPERATURE = 20, 0.07
SIZE = 16
SMALL = [f"data.image_size={SIZE}", "backbone.width=16", "optim.warmup_epochs=1", "data.leak_check=false",
         "eval.test_at_end=false"]
LABELED = ("knn_acc", "knn_prob", "probe_logp")
LABEL_FREE = ("rankme", "alpha_req", "rotation", "view_match", "lidar", "cluster_learnability", "intrinsic_dim",
              "silhouette")
TEXTURE_NEW_PHOTOS, TEXTURE_NEW_CROPS = 40, 5  # per class, per photo: the truth's images (see the module)
CLUSTERS, CLUSTER_NEIGHBOURS = 10, 5  # CLID's k-means clusters and kNN classifier, fixed before any run
RELIABILITY_HALVINGS = 200
CURVE_FRACTIONS = (0.25, 0.5, 1.0)
CURVE_DRAWS = 50


@dataclass
class DataSet:
    name: str
    tool: Path  # the folder the tool splits
    new: Path  # images no split used
    group_by: str | None  # level:1 (photo folders) or None; the new images are grouped the same way


def texture_photos(classes: int, groups: int, side: int, seed: int) -> list[list[np.ndarray]]:
    """``[class][group]`` grey isotropic textures: white noise through a radial band-pass (one centre frequency a
    class pair), half the classes thresholded to two levels. No direction is special, so no rotation is either."""
    rng = np.random.default_rng(seed)
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(side), np.fft.fftfreq(side)))
    centres = np.linspace(0.08, 0.32, (classes + 1) // 2)
    photos = []
    for k in range(classes):
        band = np.exp(-((frequency - centres[k // 2]) ** 2) / (2 * 0.03**2))
        group_photos = []
        for _ in range(groups):
            field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((side, side))) * band).real
            field = (field - field.mean()) / (field.std() + 1e-12)
            if k % 2:
                field = np.where(field > 0, 1.0, -1.0)
            group_photos.append(np.clip(128 + 50 * field, 0, 255).astype(np.uint8))
        photos.append(group_photos)
    return photos


def split_photos(photos: list[list[np.ndarray]], held_out: int) -> tuple[list, list]:
    """(the tool's photos, the set-aside ones): the last ``held_out`` groups of every class."""
    return [p[:-held_out] for p in photos], [p[-held_out:] for p in photos]


def write_mnist(root: Path, held_out: int, seed: int) -> tuple[Path, Path]:
    """MNIST-5k as two class-folder trees: the tool's images and ``held_out`` set-aside ones."""
    pool = EMBEDDED_POOLS["mnist5k"](28)
    order = np.random.default_rng(seed).permutation(len(pool))
    for name, index in (("tool", order[held_out:]), ("new", order[:held_out])):
        for i in index:
            folder = root / name / f"class_{int(pool.labels[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pool.images[i, 0].numpy()).save(folder / f"{i:05d}.png")
    return root / "tool", root / "new"


def build_sets(root: Path) -> list[DataSet]:
    sets = []
    for name, photos, held_out, new_crops in (
            ("crops", mosaic_photos(10, 12, round(1.5 * SIZE), seed=0), 4, 20),
            ("textures", texture_photos(8, 8 + TEXTURE_NEW_PHOTOS, 2 * SIZE, seed=0), TEXTURE_NEW_PHOTOS,
             TEXTURE_NEW_CROPS)):
        tool, new = split_photos(photos, held_out=held_out)
        sets.append(DataSet(name, write_photo_crops(root / name / "tool", tool, 20, SIZE),
                            write_photo_crops(root / name / "new", new, new_crops, SIZE, seed=1), "level:1"))
    tool, new = write_mnist(root / "mnist5k", held_out=1500, seed=0)
    sets.append(DataSet("mnist5k", tool, new, None))
    return sets


def recipes(trials: int, seed: int = 0) -> list[dict[str, object]]:
    """What a real search visits: weak to strong views, crops from BYOL's 0.08-1 to mild, flips on or off, lr over
    a factor 16, tau from 0.9 to 0.996, and short or full budgets."""
    rng = np.random.default_rng(seed)
    return [{"augment.strength": round(float(rng.uniform(0.0, 1.5)), 3),
             "augment.crop_scale": [round(float(rng.uniform(0.08, 0.8)), 3), 1.0],
             "augment.flip_p": float(rng.choice([0.0, 0.5])),
             "optim.lr": float(2e-3 * 2 ** rng.uniform(-2, 2)),
             "byol.tau_base": float(rng.choice([0.9, 0.97, 0.99, 0.996])),
             "optim.epochs": int(rng.choice([2, 4, 6]))} for _ in range(trials)]


def probe_logp(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor,
               classes: int) -> np.ndarray:
    """Per val image, a linear probe's log-probability of its true class (probe fitted on eval-train)."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(train.numpy(), train_labels.numpy())
    proba = np.full((len(val), classes), 1e-12)
    proba[:, probe.classes_] = np.maximum(probe.predict_proba(val.numpy()), 1e-12)
    return np.log(proba[np.arange(len(val)), val_labels.numpy()])


def corner_views(images: torch.Tensor, fraction: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-left and bottom-right ``fraction`` of uint8 images ``[N, C, S, S]``, each resized back to ``S``."""
    side = images.shape[-1]
    crop = round(fraction * side)

    def resized(part: torch.Tensor) -> torch.Tensor:
        return F.interpolate(part.float(), size=(side, side), mode="bilinear", antialias=True).round().clamp(
            0, 255).to(torch.uint8)

    return resized(images[..., :crop, :crop]), resized(images[..., side - crop:, side - crop:])


def view_match(backbone: torch.nn.Module, val: ImageSet) -> float:
    """A label-free candidate that needs no "up": how often a val image's corner view has as nearest neighbour (by
    cosine, among the other corner of every val image) a view of its own source, the image itself or, with groups,
    an image of its group (overlapping crops of one photo can share a corner). Both directions, averaged."""
    first, second = (F.normalize(extract_features(backbone, views), dim=1) for views in corner_views(val.images))
    source = (torch.arange(len(val)) if val.groups is None
              else torch.as_tensor(np.unique(val.groups, return_inverse=True)[1]))
    similarity = first @ second.T
    hits = (source[similarity.argmax(1)] == source).double() + (source[similarity.argmax(0)] == source).double()
    return float(hits.mean() / 2)


LIDAR_VIEWS = 10  # augmented views per val image (the paper's 50 cost 5x more; fixed before any run, not fitted)
LIDAR_DELTA = 1e-4  # the within-class ridge (Thilak et al. 2023; their eigenvalue floor 1e-7 is effective_rank's eps)


def lidar(embeddings: torch.Tensor) -> float:
    """LiDAR (Thilak et al., ICLR 2024, arXiv 2312.04000): the effective rank (RankMe's formula) of the LDA matrix
    ``Sigma_w^-1/2 Sigma_b Sigma_w^-1/2`` of the surrogate task whose classes are images and whose samples are their
    augmented views; ``embeddings`` ``[n images, q views, d]``."""
    n, q, d = embeddings.shape
    x = embeddings.double()
    means = x.mean(1)
    centred = means - means.mean(0)
    between = centred.T @ centred / n
    spread = (x - means[:, None]).reshape(n * q, d)
    within = spread.T @ spread / (n * q) + LIDAR_DELTA * torch.eye(d, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(within)
    root = vectors @ torch.diag(values.rsqrt()) @ vectors.T
    return effective_rank(root @ between @ root)  # its singular values are its eigenvalues: it is symmetric PSD


def lidar_of(backbone: torch.nn.Module, config: object, val: ImageSet) -> float:
    """LiDAR of the backbone's features of ``LIDAR_VIEWS`` views of every val image, drawn by the trial's own
    augmentations (the paper's surrogate task), with a fixed seed."""
    augment = BatchedViews(view_recipes(config))
    torch.manual_seed(0)
    views = [view for _ in range(LIDAR_VIEWS // len(augment.recipes)) for view in augment(val.images)]
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        features = torch.stack([backbone(view).float().flatten(1) for view in views], dim=1)
    backbone.train(was_training)
    return lidar(features)


def random_half(units: np.ndarray, seed: int) -> np.ndarray:
    """A mask of the images in a random half (``seed``) of their units (groups, or the images themselves)."""
    index = np.unique(units, return_inverse=True)[1]
    return np.isin(index, np.random.default_rng(seed).permutation(index.max() + 1)[: (index.max() + 1) // 2])


def cluster_learnability(unit: torch.Tensor, clusters: np.ndarray, groups: np.ndarray | None) -> float:
    """CLID's cluster learnability (Lu et al. 2022): how well a ``CLUSTER_NEIGHBOURS``-NN classifier (cosine) fitted
    on half the val groups (images without groups) predicts the k-means ``clusters`` of the other half; ``unit``: the
    L2-normalised val features."""
    fitted = random_half(groups if groups is not None else np.arange(len(unit)), seed=0)
    neighbours = (unit[~fitted] @ unit[fitted].T).topk(CLUSTER_NEIGHBOURS, dim=1).indices.numpy()
    votes = clusters[fitted][neighbours]
    predicted = np.array([np.bincount(row, minlength=CLUSTERS).argmax() for row in votes])
    return float((predicted == clusters[~fitted]).mean())


def intrinsic_dim(features: torch.Tensor) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017): ``N / sum log(r2 / r1)`` over the images' first and second
    nearest-neighbour distances (of the L2-normalised features; exact duplicates left out)."""
    unit = F.normalize(features.double(), dim=1)
    distances = torch.cdist(unit, unit).fill_diagonal_(float("inf"))
    nearest = distances.topk(2, dim=1, largest=False).values
    ratio = nearest[:, 1] / nearest[:, 0]
    ratio = ratio[torch.isfinite(ratio) & (ratio > 1)]
    return float(len(ratio) / ratio.log().sum())


def truth_reliability(correct: np.ndarray, units: np.ndarray) -> float:
    """The truth's split-half reliability: Spearman, over the trials, of kNN accuracy on two random halves of the
    new images' units (groups, or images), averaged over ``RELIABILITY_HALVINGS`` halvings and stepped up to the whole
    set by Spearman-Brown (2r / (1 + r)); ``correct`` is ``[trials, new images]`` 0/1."""
    rhos = []
    for draw in range(RELIABILITY_HALVINGS):
        half = random_half(units, seed=draw)
        rhos.append(stats.spearmanr(correct[:, half].mean(1), correct[:, ~half].mean(1)).statistic)
    rho = float(np.mean(rhos))
    return 2 * rho / (1 + rho)


def score_trial(backbone: torch.nn.Module, splits: DatasetSplits, new: ImageSet, config: object) -> tuple[dict, dict]:
    """Every candidate on val, and the truths (kNN on new images; the tool's test split for reference); plus the
    per-val-image values of the labeled candidates, for the val-size curve, and which new images kNN got right."""
    memory, labels = extract_features(backbone, splits.eval_train.images), splits.eval_train.labels
    k = fitted_knn_k(K, labels)
    features = {name: extract_features(backbone, s.images) for name, s in
                (("val", splits.val), ("test", splits.test), ("new", new))}
    val_labels = splits.val.labels
    shares = knn_vote_shares(memory, labels, features["val"], splits.num_classes, k, TEMPERATURE)
    per_image = {"knn_acc": (shares.argmax(1) == val_labels).double().numpy(),
                 "knn_prob": true_class_share(shares, val_labels).double().numpy(),
                 "probe_logp": probe_logp(memory, labels, features["val"], val_labels, splits.num_classes)}
    alpha = alpha_exponent(features["val"])
    unit = F.normalize(features["val"].float(), dim=1)  # k-means, CLID's kNN and the silhouette work on the sphere
    clusters = KMeans(CLUSTERS, n_init=3, random_state=0).fit_predict(unit.numpy())
    scores = {name: float(values.mean()) for name, values in per_image.items()}
    scores |= {"knn_prob_se": bootstrap_se(per_image["knn_prob"], splits.val.groups),
               "knn_acc_se": bootstrap_se(per_image["knn_acc"], splits.val.groups),
               "rankme": effective_rank(features["val"]), "alpha": alpha, "alpha_req": alpha_req_score(alpha),
               "rotation": rotation_probe_accuracy(lambda x: extract_features(backbone, x), splits.val.images),
               "view_match": view_match(backbone, splits.val), "lidar": lidar_of(backbone, config, splits.val),
               "cluster_learnability": cluster_learnability(unit, clusters, splits.val.groups),
               "intrinsic_dim": intrinsic_dim(features["val"]),
               "silhouette": float(silhouette_score(unit.numpy(), clusters, metric="cosine"))}
    for truth in ("test", "new"):
        truth_labels = splits.test.labels if truth == "test" else new.labels
        predicted = knn_vote_shares(memory, labels, features[truth], splits.num_classes, k, TEMPERATURE).argmax(1)
        per_image[f"{truth}_correct"] = (predicted == truth_labels).double().numpy()
        scores[f"{truth}_knn_acc"] = float(per_image[f"{truth}_correct"].mean())
    return scores, per_image


def run_set(data: DataSet, trial_recipes: list[dict]) -> tuple[pd.DataFrame, list[dict], DatasetSplits, dict]:
    base = load_config(overrides=["data.source=folder", f"data.path={data.tool}", *SMALL,
                                  *([f"data.group_by={data.group_by}"] if data.group_by else [])])
    splits = load_splits(base.data)
    new, new_names, _ = load_images(str(data.new), SIZE)
    random_init = build_model(base).backbone
    facts = {"rotation at random init": rotation_probe_accuracy(lambda x: extract_features(random_init, x),
                                                                splits.val.images),
             "val images": len(splits.val), "val groups": splits.val.group_count(), "new images": len(new)}
    facts["orientation informative"] = orientation_informative(facts["rotation at random init"], len(splits.val))
    rows, per_images = [], []
    for index, recipe in enumerate(trial_recipes):
        config = base.replace({**recipe, "seed": index, "eval.every_epochs": recipe["optim.epochs"]})
        trainer = Trainer(config, lambda _metrics, _checkpoint: None, WorkerContext(), splits=splits)
        started = time.perf_counter()
        trainer.fit()
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        scores, per_image = score_trial(trainer.method.backbone, splits, new, config)
        rows.append({"trial": index, **{k: v for k, v in recipe.items() if k != "augment.crop_scale"},
                     "crop_min": recipe["augment.crop_scale"][0], **scores,
                     "epoch_s": train_s / recipe["optim.epochs"], "score_s": time.perf_counter() - started})
        per_images.append(per_image)
        print(f"{data.name} trial {index}: new {scores['new_knn_acc']:.3f} val knn_acc {scores['knn_acc']:.3f} "
              f"knn_prob {scores['knn_prob']:.3f} rankme {scores['rankme']:.1f} rotation {scores['rotation']:.3f} "
              f"view_match {scores['view_match']:.3f} lidar {scores['lidar']:.1f}",
              flush=True)
    units = np.array([Path(name).parent.name if data.group_by else name for name in new_names])
    facts["new groups"] = len(np.unique(units))
    facts["truth reliability"] = truth_reliability(np.stack([p["new_correct"] for p in per_images]), units)
    return pd.DataFrame(rows), per_images, splits, facts


def correlations(table: pd.DataFrame, truth: str) -> dict[str, tuple[float, float]]:
    return {name: (stats.spearmanr(table[name], table[truth]).statistic,
                   stats.kendalltau(table[name], table[truth]).statistic) for name in (*LABELED, *LABEL_FREE)}


def size_curve(per_images: list[dict], splits: DatasetSplits, truth: np.ndarray) -> list[dict]:
    """Mean Spearman with the truth when only a fraction of the val groups (or images) is scored."""
    groups = splits.val.groups if splits.val.groups is not None else np.arange(len(splits.val)).astype(str)
    names = np.unique(groups)
    rng = np.random.default_rng(0)
    rows = []
    for fraction in CURVE_FRACTIONS:
        draws = 1 if fraction == 1.0 else CURVE_DRAWS
        for objective in ("knn_acc", "knn_prob"):
            rhos, images = [], []
            for _ in range(draws):
                chosen = np.isin(groups, rng.choice(names, max(2, round(fraction * len(names))), replace=False))
                scores = [values[chosen].mean() for values in (p[objective] for p in per_images)]
                rhos.append(stats.spearmanr(scores, truth).statistic)
                images.append(int(chosen.sum()))
            rows.append({"objective": objective, "val groups": max(2, round(fraction * len(names))),
                         "val images": int(np.mean(images)), "Spearman with new": float(np.nanmean(rhos))})
    return rows


def winner_gap(table: pd.DataFrame, objective: str) -> float:
    """New-image kNN of the trial the objective picks, minus that of the trial the old objective (knn_acc) picks,
    in points."""
    return 100 * (table.loc[table[objective].idxmax(), "new_knn_acc"] - table.loc[table["knn_acc"].idxmax(),
                                                                                  "new_knn_acc"])


def plot(results: dict[str, pd.DataFrame], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4))
    for ax, (name, table) in zip(np.atleast_1d(axes), results.items(), strict=True):
        for objective, marker in (("knn_acc", "o"), ("knn_prob", "s")):
            ax.scatter(100 * table[objective], 100 * table["new_knn_acc"], marker=marker, label=objective, alpha=0.7)
        ax.set(title=name, xlabel="val score (x100)", ylabel="new-image kNN accuracy (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: dict, curves: dict, facts: dict, args: argparse.Namespace, seconds: float) -> str:
    rows = []
    for name, table in results.items():
        for objective, (rho, tau) in correlations(table, "new_knn_acc").items():
            top = table.nlargest(len(table) // 2, "new_knn_acc")
            full = table[table["optim.epochs"] == table["optim.epochs"].max()]
            rows.append({"data": name, "objective": objective, "Spearman (new)": rho, "Kendall (new)": tau,
                         "Spearman (test)": stats.spearmanr(table[objective], table["test_knn_acc"]).statistic,
                         "Spearman, best half (new)": stats.spearmanr(top[objective], top["new_knn_acc"]).statistic,
                         "Spearman, full budget (new)": stats.spearmanr(full[objective],
                                                                        full["new_knn_acc"]).statistic,
                         "winner vs knn_acc's on new (points)": winner_gap(table, objective)})
    summary = pd.DataFrame(rows)
    fact_rows = pd.DataFrame([{"data": name, **f, "spread of new kNN (points)": 100 * (
        results[name]["new_knn_acc"].max() - results[name]["new_knn_acc"].min()),
        "median knn_prob SE (points)": 100 * results[name]["knn_prob_se"].median(),
        "median knn_acc SE (points)": 100 * results[name]["knn_acc_se"].median(),
        "scoring s / epoch s": (results[name]["score_s"] / results[name]["epoch_s"]).median()}
        for name, f in facts.items()])
    curve = pd.DataFrame([{"data": name, **row} for name, rows in curves.items() for row in rows])
    return (f"## Objective rank\n\n{time.strftime('%Y-%m-%d')}, {machine()}. "
            f"`python -m bench.objective_rank --trials {args.trials}`: {args.trials} recipes a data set, "
            f"{seconds / 60:.0f} min in all. Truth: kNN accuracy on images no split used.\n\n"
            + markdown_table(summary) + "\n\n" + markdown_table(fact_rows) + "\n\nVal size curve (mean Spearman with "
            "new-image kNN when a fraction of the val groups is scored):\n\n" + markdown_table(curve)
            + "\n\n![objective vs new images](objective_rank.png)\n")


def demo_cost() -> dict[str, float]:
    """What one evaluation costs at the demo's size (MNIST-5k at the demo's scale) against one epoch; the evaluation
    timed after a first one, as in a trial, where every epoch is evaluated."""
    base = load_config(overrides=["data.source=mnist5k", *DEMO_SCALE, "data.leak_check=false", "optim.epochs=1",
                                  "optim.warmup_epochs=0", "eval.test_at_end=false"])
    splits = load_splits(base.data)
    trainer = Trainer(base, lambda _metrics, _checkpoint: None, WorkerContext(), splits=splits)
    started = time.perf_counter()
    trainer.fit()
    epoch_s = time.perf_counter() - started
    evaluate_backbone(trainer.method.backbone, splits, base.eval, bf16=trainer.bf16)
    started = time.perf_counter()
    evaluate_backbone(trainer.method.backbone, splits, base.eval, bf16=trainer.bf16)
    return {"epoch s": epoch_s, "evaluation s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--write", action="store_true", help="replace the section in bench/RESULTS.md")
    args = parser.parse_args()
    started = time.perf_counter()
    cost = demo_cost()
    results, curves, facts = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="objective-rank-") as root:
        for data in build_sets(Path(root)):
            table, per_images, splits, facts[data.name] = run_set(data, recipes(args.trials))
            results[data.name] = table
            curves[data.name] = size_curve(per_images, splits, table["new_knn_acc"].to_numpy())
            table.to_csv(Path(__file__).parent / f"objective_rank_{data.name}.csv", index=False)
    text = report(results, curves, facts, args, time.perf_counter() - started)
    text += (f"\nCost at the demo's size (MNIST-5k, {' '.join(DEMO_SCALE)}): one epoch {cost['epoch s']:.1f} s, "
             "one evaluation "
             f"(kNN accuracy and vote share with bootstrap standard errors, RankMe, alpha-ReQ) "
             f"{cost['evaluation s']:.2f} s ({100 * cost['evaluation s'] / cost['epoch s']:.0f} % of the epoch).\n")
    plot(results, Path(__file__).parent / "objective_rank.png")
    print(text)
    if args.write:
        replace_section("Objective rank", text)


if __name__ == "__main__":
    main()
