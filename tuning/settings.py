"""A sweep's settings: what ``ssl-tune tune`` flags set, where the sweep's files live, and their persistence.

``<storage>/<name>/ssl_tune_sweep.json`` holds the settings a sweep started with, so that ``--resume NAME``
needs only the name (and the storage).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from search_spaces import SearchSpace, load_space
from ssl_train.config import ConfigError, TrainConfig, check_at_least, load_config
from ssl_train.data import uris

DEFAULT_EXPERIMENT = "ssl-tune"  # the MLflow experiment of sweeps and runs
SETTINGS_FILE = "ssl_tune_sweep.json"
STUDY_FILE = "optuna.db"  # the persisted Optuna study: optuna-dashboard sqlite:///<sweep>/optuna.db
CONFIRM_DIR = "confirm"  # the confirmation stage's Tune experiment, inside the sweep directory
LOG_FILE = "sweep.log"  # Tune's status tables and Ray's INFO logs (the console gets the compact lines)
SWEEP_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")  # a folder name: no separators, no leading dot
EXTEND_PREFIX = "extend-"  # Tune experiments that extend a finished search (--resume NAME --trials N)


def default_min_epochs(epochs: int) -> int:
    """ASHA's grace period unless --min-epochs says otherwise: half the trials' epochs, rounded up, and at least 2
    (capped at the epochs). On the demo (MNIST-5k, 6 epochs, 24 random configs, bench/asha_rungs.py) val at epoch
    1, 2, 3 ranked configs by their final val with Spearman -0.19, 0.70, 0.80: epoch 1, in the warm-up, says nothing."""
    return min(epochs, max(2, math.ceil(epochs / 2)))


@dataclass
class SweepSettings:
    """How to search: what ``ssl-tune tune`` flags set."""

    space: str = "byol"
    start: str = "the base config"  # what the search starts from and confirmation compares with, in words
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    trials: int = 12
    min_epochs: int | None = None  # epochs before ASHA may stop a trial; None: half the trials' epochs
    reduction_factor: int = 2
    concurrency: int = 2
    searcher: str = "tpe"  # tpe | random | pbt (a population, tuning.population)
    scheduler: str = "asha"
    perturb_every: int | None = None  # pbt: epochs between exploits; None: a quarter of the epochs, rounded up
    objective: str = "auto"  # auto | knn_prob | knn_acc | linear_acc | rankme | alpha_req | rotation
    collapse_threshold: float = 0.05
    trial_time_limit_s: float | None = None
    time_budget_s: float | None = None
    seed: int = 0
    name: str | None = None
    storage: str = "runs/sweeps"
    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    keep_best: int = 3
    address: str | None = None
    confirm: bool = True
    confirm_top: int = 2
    confirm_seeds: int | str = 3  # or "auto": add seeds in rounds until the margin is decided (tuning.sequential)
    min_effect: float = 0.0  # with confirm_seeds "auto": stop adding seeds once the margin is at or below this
    max_confirm_seeds: int = 10  # with confirm_seeds "auto": the most seeds the winner and the default get
    extensions: int = 0  # Tune experiments extend-1..K added by --resume NAME --trials N
    register: str | None = None  # register the winner's MLflow Model under this name
    keep_checkpoints: bool = False  # keep every trial's newest checkpoint, not only the logged winners'
    start_timeout_s: float | None = 600.0  # fail a stage none of whose trials started by then (None: wait forever)

    def base_config(self) -> TrainConfig:
        """The search trials' base: the user's config, never evaluated on test (confirmation runs turn it on)."""
        overrides = [f"eval.collapse_threshold={self.collapse_threshold}", *self.overrides, "eval.test_at_end=false"]
        if self.objective == "linear_acc":
            overrides.append("eval.linear_probe=true")
        if self.objective == "rotation":
            overrides.append("eval.rotation_probe=true")
        return load_config(self.config, overrides).with_absolute_paths()  # trials run in their own directories


def check_sweep_name(name: str | None, flag: str = "--name") -> None:
    """A sweep's name becomes a folder (``<storage>/<name>``): refuse one that would leave it (``../x``, ``a/b``)."""
    if name is not None and not SWEEP_NAME.fullmatch(name):
        raise ConfigError(f"{flag} {name!r}: a sweep name is a folder name: letters, digits, '.', '_' and '-', at "
                          "most 100 characters, not starting with '.'")


def check_counts(settings: SweepSettings, resume: bool) -> None:
    """The sweep's counts, before anything is saved or Ray starts (Tune and ASHA would raise only then).

    ``trials`` may be 0 on a resume: no extension.
    """
    check_sweep_name(settings.name, "--resume" if resume else "--name")
    check_at_least(settings, {"trials": 0 if resume else 1, "min_epochs": 1, "concurrency": 1, "keep_best": 0,
                              "perturb_every": 1})


def check_settings(settings: SweepSettings, resume: bool) -> tuple[SweepSettings, TrainConfig, SearchSpace]:
    """Every check of a sweep's settings that needs no data, Ray or server: counts, name, the saved settings of a
    resumed sweep, searcher and scheduler, the space and the objective. Light imports only, so that the command line
    answers a bad argument at once. Returns the settings (a resume's as saved, named), the base config and space."""
    from tuning.objective import check_objective

    check_counts(settings, resume)
    if resume:
        settings = load_settings(settings)
    settings.name = settings.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    base = settings.base_config()
    if not resume and settings.scheduler == "asha" and (settings.min_epochs or 0) > base.optim.epochs:
        raise ConfigError(f"--min-epochs {settings.min_epochs} is more than the trials' {base.optim.epochs} epochs "
                          "(--epochs / optim.epochs): ASHA could never stop a trial; lower --min-epochs")
    if settings.searcher not in ("tpe", "random", "pbt") or settings.scheduler not in ("asha", "none"):
        raise ConfigError(
            f"searcher={settings.searcher!r} / scheduler={settings.scheduler!r}: use tpe|random|pbt and asha|none"
        )
    check_confirmation(settings)
    space = load_space(settings.space, base)
    check_objective(settings.objective, space)
    if settings.searcher == "pbt":
        check_population(settings, base, space)
    return settings, base, space


def check_population(settings: SweepSettings, base: TrainConfig, space: SearchSpace) -> None:
    """A PBT search: schedulable knobs only, at least 4 members, a perturbation inside the run;
    ``perturb_every`` set to its default when not given."""
    from tuning.population import check_schedulable

    check_schedulable(space)
    epochs = base.optim.epochs
    settings.perturb_every = settings.perturb_every or math.ceil(epochs / 4)
    if settings.perturb_every >= epochs:
        raise ConfigError(f"--perturb-every {settings.perturb_every}: a member trains {epochs} epochs, so it would "
                          f"never copy another; use at most {epochs - 1}, or more --epochs")
    if settings.trials < 4:
        raise ConfigError(f"--trials {settings.trials}: --searcher pbt needs a population of at least 4 members (the "
                          "bottom quarter copies the top quarter); PBA used 16")


AUTO_SEEDS = "auto"


def check_confirmation(settings: SweepSettings) -> None:
    """``--confirm-top`` >= 1 and ``--confirm-seeds`` >= 1 or ``auto`` (unless ``--no-confirm``)."""
    seeds = settings.confirm_seeds
    if not settings.confirm:
        return
    if seeds != AUTO_SEEDS and (not isinstance(seeds, int) or seeds < 1):
        raise ConfigError(f"--confirm-seeds {seeds}: use a number >= 1, or auto (add seeds until the margin is "
                          "decided)")
    if settings.confirm_top < 1:
        raise ConfigError(f"--confirm-top {settings.confirm_top}: must be >= 1 (or --no-confirm)")
    if seeds == AUTO_SEEDS and settings.max_confirm_seeds < 4:
        raise ConfigError(f"--max-confirm-seeds {settings.max_confirm_seeds}: with --confirm-seeds auto it must be "
                          "at least 4 (3 seeds, then at least one more round)")


def first_round_seeds(settings: SweepSettings) -> int:
    """Seeds per config in confirmation's first (or only) round."""
    from tuning.sequential import FIRST_SEEDS

    return FIRST_SEEDS if settings.confirm_seeds == AUTO_SEEDS else int(settings.confirm_seeds)


def confirmation_looks(confirm_seeds: int | str, max_confirm_seeds: int) -> tuple[int, ...] | None:
    """The seed counts at which ``--confirm-seeds auto`` tests the margin; None for a fixed number of seeds."""
    from tuning.sequential import seed_looks

    return seed_looks(max_confirm_seeds) if confirm_seeds == AUTO_SEEDS else None


def sweep_path(settings: SweepSettings) -> Path:
    """The sweep's own files (settings, Optuna study, best config, tables, plots): a local directory.

    It is ``<storage>/<name>`` for a local ``--storage`` or a ``file://`` URI, and ``runs/sweeps/<name>``
    here when the storage is remote (``s3://...``), where Ray keeps the Tune experiments.
    """
    local = uris.local_path(settings.storage, "--storage")
    return (local if local is not None else Path("runs/sweeps").resolve()) / settings.name


def tune_path(settings: SweepSettings, experiment: str | None = None) -> str:
    """Where Tune keeps the sweep's search experiment, or one nested in it (``extend-1``, ``confirm-12``):
    a local path or the storage URI, given to Ray untouched."""
    root = f"{uris.absolute(settings.storage).rstrip('/')}/{settings.name}"
    return root if experiment is None else f"{root}/{experiment}"


def save_settings(settings: SweepSettings, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=2))


def load_settings(settings: SweepSettings) -> SweepSettings:
    """The settings a sweep started with (``--resume NAME`` needs only the name and storage)."""
    stored = sweep_path(settings) / SETTINGS_FILE
    if not settings.name or not stored.is_file():
        raise FileNotFoundError(f"--resume {settings.name}: no sweep settings at '{stored}'")
    saved = SweepSettings(**json.loads(stored.read_text()))
    saved.tracking_uri = settings.tracking_uri or saved.tracking_uri
    saved.address = settings.address
    saved.trials = max(saved.trials, settings.trials or 0)  # --trials N on a resume extends the search to N
    saved.keep_checkpoints = settings.keep_checkpoints
    saved.start_timeout_s = settings.start_timeout_s
    return saved
