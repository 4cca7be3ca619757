"""The experiment config: one YAML per experiment, validated by a typed schema.

Every section is a pydantic model with ``extra="forbid"``, so an unknown key, a wrong type or an
out-of-range value is reported as one line naming the key and what is allowed. Any key can be
overridden from the command line with ``--set section.key=value`` (the value is parsed as YAML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator, model_validator

from specdistill.errors import SpecdistillError
from specdistill.hashing import digest_json


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Which data source, and its options (each source reads the options it understands)."""

    source: Literal["glyphs-latin", "glyphs-hanzi", "fashion-mnist", "synthetic", "imagefolder",
                    "cifar100"] = "glyphs-latin"
    image_size: int = Field(32, ge=8, le=512)
    # rendered sources: augmented copies rendered per (class, font) into the cache
    copies_per_font: int = Field(8, ge=1, le=1000)
    # glyphs-hanzi: the N most common GB2312 level-1 characters; synthetic: number of classes
    num_classes: int | None = Field(None, ge=2)
    # synthetic: classes per planted confusable group, and examples per class and split
    group_size: int = Field(5, ge=1)
    examples_per_class: int = Field(40, ge=1)
    # fraction of training examples held out for validation where a source has no natural split
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    # imagefolder / cifar100 / fashion-mnist: where the data lives (None = the source's default)
    root: str | None = None
    # imagefolder: optional subset of class folder names
    classes: list[str] | None = None
    # where rendered sources cache their uint8 arrays (None = ~/.cache/specdistill)
    cache_dir: str | None = None
    # on-the-fly augmentation of training batches: glyph sources an affine jitter, natural sources
    # (imagefolder, cifar100) torchvision's RandomResizedCrop + horizontal flip (specdistill/data/loading.py)
    augment: bool = True
    # natural sources: the range of RandomResizedCrop's crop area, as a share of the image
    crop_scale: tuple[float, float] = (0.08, 1.0)
    # imagefolder: read batches from the files instead of decoding every image into memory once;
    # auto = stream when the decoded arrays would exceed 2 GiB (specdistill/data/folder.py)
    stream: bool | Literal["auto"] = "auto"
    # streaming: DataLoader worker processes decoding training batches (None = min(8, CPUs))
    loader_workers: int | None = Field(None, ge=0)
    # keep at most this many examples per split (tests, smoke runs); None = all
    limit: int | None = Field(None, ge=1)
    # keep at most this many held-out and test examples, the training split whole (large K: every
    # held-out choice and the reported numbers on a sample); None = all
    eval_limit: int | None = Field(None, ge=1)
    # seeds rendering jitter, synthetic prototypes and carved-out held-out splits; apart from the
    # experiment seed so that every model of an experiment (e.g. teachers of several seeds) sees the
    # same data and the same splits
    data_seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_stream_and_crop(self) -> DataConfig:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"data.crop_scale {list(self.crop_scale)} must be two shares of the image "
                             "with 0 < low <= high <= 1, e.g. [0.08, 1.0]")
        if self.stream is True and self.source != "imagefolder":
            raise ValueError(f"data.stream: true streams imagefolder only; {self.source} is held in memory "
                             "(set data.stream to auto or false)")
        return self


class ModelConfig(_Section):
    # a registered name (resnet_cifar, mlp, resnet18, ...) or torchvision:<arch>, timm:<arch>,
    # python:<module>:<function> (specdistill/model_zoo.py)
    name: str = "resnet_cifar"
    depth: int = Field(20, ge=8, le=200)      # resnet_cifar: 6n+2
    width: int = Field(16, ge=4, le=512)      # resnet_cifar: channels of the first stage
    hidden: list[int] = Field(default_factory=lambda: [1200, 1200])  # mlp
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # torchvision / timm: start from the library's own weights (downloaded or in its cache)
    pretrained: bool = False
    # the input normalisation the weights expect, per channel, on images scaled to [0, 1]; unset =
    # the project's x/127.5-1 (an imported library model defaults to its weights' own, e.g. ImageNet's)
    mean: list[float] | None = None
    std: list[PositiveFloat] | None = None

    def grows_from(self, other: ModelConfig) -> bool:
        """Whether ``other``'s weights fit in this network (``models.widen_from``): the same network, or a
        registered one (``resnet_cifar``, ``mlp``) differing only in larger widths."""
        if self == other:
            return True
        same = self.model_dump(exclude={"width", "hidden"}) == other.model_dump(exclude={"width", "hidden"})
        return (same and self.name in ("resnet_cifar", "mlp") and self.width >= other.width
                and len(self.hidden) == len(other.hidden) and all(a >= b for a, b in zip(self.hidden, other.hidden)))


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "step", "constant", "onecycle"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    patience: int | None = Field(None, ge=1)   # early stopping on held-out accuracy
    amp: bool = True                            # only takes effect on CUDA
    channels_last: bool = True                  # only takes effect on CUDA
    num_threads: int | None = Field(None, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    # data-parallel training through Ray Train (specdistill/distributed.py): this many DDP workers,
    # each taking its share of every batch of batch_size (the global batch stays batch_size); 1 = this
    # process alone. use_gpu: one GPU per worker ("auto": when the Ray cluster has one for each)
    workers: int = Field(1, ge=1, le=4096)
    use_gpu: bool | Literal["auto"] = "auto"


class GeneralistConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # import a trained generalist instead of training one (generalist/importing.py): a state_dict
    # saved with torch.save, a safetensors file, or a timm / torchvision checkpoint dict, for the
    # architecture model.name; model.pretrained=true imports the library's own weights instead
    weights: str | None = None
    # how the held-out and test predictions are stored (specdistill/predictions.py): dense float32
    # [N, K] log-probabilities, or each row's top predictions_top_k and the residual mass (grows with
    # N x top_k, not N x K); auto = dense while one split's file stays within dense_predictions_limit_mb
    predictions: Literal["auto", "dense", "topk"] = "auto"
    predictions_top_k: int = Field(64, ge=1)
    dense_predictions_limit_mb: float = Field(1024.0, gt=0.0)


class ClusteringConfig(_Section):
    k: int = Field(20, ge=1)
    # faiss (k-means++ seeds): same ARI as sklearn, 4x faster at K=15,000, GPU when available
    backend: Literal["sklearn", "minibatch", "faiss"] = "faiss"
    # the matrix whose columns are clustered; "+" combines variants (see clustering/matrices.py);
    # the default won the planted-group benchmark (benchmarks/results/clustering.md)
    matrix: Literal["covariance", "correlation", "offdiag", "normalized", "correlation+offdiag",
                    "correlation+normalized", "offdiag+normalized",
                    "correlation+offdiag+normalized"] = "correlation+offdiag+normalized"
    size: int | None = Field(None, ge=2)        # grow each group to this many classes (overlap)
    min_size: int = Field(2, ge=1)              # drop groups smaller than this
    # drop k-means groups larger than this (before growing): classes the generalist hardly ever confuses
    # give near one-hot held-out rows, no confusion signal, and k-means lumps them into one giant group
    # (394 of 500 classes on a 99.8%-accurate image folder). Those classes stay with the generalist.
    max_size: int | None = Field(None, ge=1)
    # soften the held-out predictions before the matrix, p ** (1 / T) renormalised (softmax of the logits / T):
    # a converged generalist's rows are near one-hot, its second choices (the confusions that make groups) sit
    # orders of magnitude below the top one and k-means lumps most classes into giant groups; T = 2 brings them up
    # (hanzi-1k, 20-epoch generalist: 40 groups of 11-50 classes instead of 512 + 301 + 35 small ones). None = as stored
    temperature: float | None = Field(None, gt=0.0)
    top_k: int | None = Field(None, ge=1)       # sparse path: keep the top-k probabilities per row
    sketch_dim: int | None = Field(None, ge=2)  # low-rank path: cluster a sketch of the columns
    seed: int | None = None                     # None = the experiment seed
    n_init: int = Field(5, ge=1)                # k-means restarts (the best inertia wins)
    max_iter: int = Field(100, ge=1)
    # above this many classes, top_k / sketch_dim left unset become 32 / 256 (the scalable path)
    auto_scale_classes: int = Field(5000, ge=2)


class SoftTargetConfig(_Section):
    # off by default: on held-out data soft targets from the generalist did not help the specialists
    # consistently (benchmarks/results/specialists.md: glyphs-latin and synthetic); of the two settings
    # measured, T=4 / alpha=0.2 did no harm on average and T=2 / alpha=0.5 hurt, hence these values
    enabled: bool = False
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.2, ge=0.0, le=1.0)


class SpecialistsConfig(_Section):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=3, lr=0.01))
    # the specialists' network: None = the generalist's (the paper's); else the generalist's network made
    # wider (a larger width or hidden sizes), which starts as the generalist's function (models.widen_from)
    # and has more room to learn its group's fine distinctions, at that much more compute per consultation
    model: ModelConfig | None = None
    specialist_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    soft_targets: SoftTargetConfig = Field(default_factory=SoftTargetConfig)
    freeze_backbone: bool = False
    # train only the new head (group classes + dustbin) for this many epochs first, on the generalist's
    # frozen features, then everything for train.epochs ("keep the generalist's features"); 0 = off
    head_epochs: int = Field(0, ge=0)
    # activation-matched dustbin (specialists/sampler.py): this share of each batch's dustbin half comes
    # from the generalist's confusions into the group - training examples of other classes whose
    # generalist top-confusion_top_n holds a group class, i.e. what activates the specialist at
    # inference - the rest at random; the dustbin correction accounts for it. It is exact wherever the
    # specialist is consulted when confusion_top_n >= combine.top_n (a larger n finds more confusions on a
    # training split the generalist fits). 0 = the paper's random remainder alone
    confusion_fraction: float = Field(0.0, ge=0.0, le=1.0)
    confusion_top_n: int = Field(1, ge=1)
    num_gpus_per_task: float = Field(0.0, ge=0.0)  # 0 = auto: 1 when the cluster has GPUs
    num_cpus_per_task: float = Field(1.0, gt=0.0)
    max_retries: int = Field(3, ge=0)
    ray_address: str | None = None              # None = connect if in a cluster, else embedded
    # how the dustbin row of the new head is fitted to the generalist (specialists/model.py)
    dustbin_init: Literal["kl", "lstsq", "constant"] = "kl"
    # False: the driver ships the data arrays through the object store (only it reads the dataset);
    # True: every worker loads data itself (the dataset path must be visible on every node)
    load_data_on_workers: bool = False


class CombineConfig(_Section):
    top_n: int = Field(1, ge=1)
    solver: Literal["fixed_point", "em", "gradient"] = "fixed_point"   # see combine.kl_combine
    max_iter: int = Field(200, ge=1)
    tol: float = Field(1e-9, gt=0.0)
    # fit a temperature per model (generalist, each specialist) on held-out data before combining
    calibrate: bool = False
    # fit one temperature on the combined distribution too, after the gate and the weights, by held-out NLL:
    # the KL combination of several models comes out flatter than any of them (hanzi-3755-narrow: mean top
    # probability 0.36 at 42% accuracy); sharpening it changes no prediction, only the confidences the
    # report's NLL and ECE score and the targets the student learns from
    calibrate_ensemble: bool = False
    # consult a specialist only where held-out data says it helps (combine/gating.py): none, group_gain
    # (keep the specialists that gain on their held-out examples), confidence (only where the
    # generalist's top probability is below a held-out-chosen threshold), both
    gate: Literal["none", "group_gain", "confidence", "both"] = "none"
    # each consulted specialist's weight in the KL objective (eq. 5): equal (1, the paper's) or fitted
    # on held-out data per specialist from a small grid by log-loss (combine/gating.py: fit_weights)
    weighting: Literal["equal", "fitted"] = "equal"
    # a split's generalist log-probabilities are held whole up to this size ([N, K] float32); beyond it
    # the generalist runs again for each chunk of rows a step reads (combine/outputs.py): memory bounded
    # at any N, the same numbers
    memory_limit_mb: float = Field(1024.0, gt=0.0)
    # also score the alternatives beside the configured combiner: the KL combiner with top-1, 2 and 3
    # activation, and the average and product of the same distributions. Off, combine runs the
    # configured system alone (several times less work at K = 15,000)
    alternatives: bool = True
    # also train and score what a user would weigh against the specialists (combine/rivals.py): the
    # generalist trained longer by the specialists' training compute, and a mean of two generalists
    # (seeds s and s+1); on the same examples, in the combine report
    rivals: bool = False
    # check the held-out choices (calibration, gate, weights) on held-out examples they were not fitted on
    # (combine/choices.py): fit them again on all but one of F folds of the held-out split, score the fold
    # left out, F times; in the combine report beside the held-out accuracy. 0: off; hanzi: 3 (one per font)
    cross_fit: int = Field(0, ge=0)

    @field_validator("cross_fit")
    @classmethod
    def _folds(cls, value: int) -> int:
        if value == 1:
            raise ValueError("one fold leaves nothing to fit on; use 0 (off) or at least 2 folds")
        return value


class StudentLossConfig(_Section):
    name: Literal["hinton", "logit_matching", "noisy_teacher", "hard"] = "hinton"
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    noise_std: float = Field(0.1, ge=0.0)
    noise_fraction: float = Field(1.0, ge=0.0, le=1.0)  # noisy_teacher: share of each batch perturbed


class StudentConfig(_Section):
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(depth=14, width=8))
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: StudentLossConfig = Field(default_factory=StudentLossConfig)
    teacher: Literal["ensemble", "generalist", "generalists"] = "ensemble"
    teacher_seeds: list[int] = Field(default_factory=lambda: [0, 1])
    cache_top_k: int = Field(32, ge=1)
    assistant: ModelConfig | None = None        # teacher-assistant chain: teacher -> assistant -> student
    # students trained beside the main one for comparison: true = all three, false = none, or a list
    # of "hard" (labels only), "from-generalist", "from-ensemble" (the main student's own is skipped)
    baselines: bool | list[Literal["hard", "from-generalist", "from-ensemble"]] = True
    # where the teacher's targets come from: "cached" - computed once on the un-augmented training images
    # and reused for every augmented view (cheap); "augmented" - the teacher (generalist or ensemble) runs
    # on the very augmented batch the student sees, every step ("consistent" teaching, Beyer et al. 2022;
    # costs the teacher's forward pass per step)
    teacher_view: Literal["cached", "augmented"] = "cached"
    # where the student and its baselines start: "scratch" (random weights) or "generalist" (the run's
    # generalist's weights, so distillation fine-tunes the network the user already has; student.model must
    # then be generalist.model or the same network made wider, which starts as the generalist's function:
    # models.widen_from). The assistant of student.assistant starts from scratch either way.
    init: Literal["scratch", "generalist"] = "scratch"
    # mixup on every student's training batches (Zhang et al. 2018), the Beta(a, a) parameter a; 0 = off. With
    # teacher_view: augmented the teacher scores each mixed image ("function matching", Beyer et al. 2022: a
    # teacher sure of every training image is unsure of a mix, which is where the specialists add knowledge);
    # with cached targets the teacher's targets are mixed like the labels (specdistill.kd.Mix)
    mixup: float = Field(0.0, ge=0.0)


class PaperConfig(_Section):
    """The paper's section-3 and section-6 experiments (paper/, benchmarks/bench_paper_fmnist.py).

    The ``generalist`` section is the large regularised net, the ``student`` section the small net
    (its ``loss.temperature`` is the T of the gap and missing-class experiments); these keys add the
    regularisation the model schema lacks and the grids searched on held-out data.
    """

    input_dropout: float = Field(0.2, ge=0.0, lt=1.0)     # large net: dropout on the input pixels
    jitter_px: float = Field(2.0, ge=0.0)                  # large net: random shifts up to this many pixels
    alphas: list[float] = Field(default_factory=lambda: [0.5, 0.9, 1.0])   # soft-term weights tried
    temperatures: list[float] = Field(default_factory=lambda: [1.0, 2.0, 2.5, 4.0, 8.0, 20.0])
    widths: list[int] = Field(default_factory=lambda: [30, 300, 800])     # sweep students: 2 layers
    missing_class: int = Field(3, ge=0)
    bias_max: float = Field(10.0, gt=0.0)                  # bias corrections tried: 0, step, ..., max
    bias_step: float = Field(0.25, gt=0.0)
    small_fraction: float = Field(0.03, gt=0.0, lt=1.0)    # the small labelled set (stratified)
    small_repeats: int = Field(8, ge=1)                    # passes over the small set per epoch
    small_train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        epochs=10, batch_size=256, optimizer="adamw", lr=0.001, weight_decay=0.0))
    synthetic_copies: int = Field(10, ge=1)                # MUNGE copies of the small set
    munge_p: float = Field(0.5, ge=0.0, le=1.0)            # share of pixels resampled near the neighbour's
    munge_s: float = Field(2.0, gt=0.0)                    # spread: |difference| / s
    synthetic_jitter_px: int = Field(1, ge=0)              # whole-pixel shifts of the MUNGE copies


class Config(_Section):
    name: str = "experiment"
    seed: int = 0
    run_dir: str | None = None                  # None = runs/<name>
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    generalist: GeneralistConfig = Field(default_factory=GeneralistConfig)
    clustering: ClusteringConfig = Field(default_factory=ClusteringConfig)
    specialists: SpecialistsConfig = Field(default_factory=SpecialistsConfig)
    combine: CombineConfig = Field(default_factory=CombineConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    paper: PaperConfig | None = None             # only the paper-experiment configs set it

    @model_validator(mode="before")
    @classmethod
    def _specialists_model_from_generalist(cls, data: Any) -> Any:
        """specialists.model: the keys left out are generalist.model's, so ``--set specialists.model.width=16``
        asks for the generalist's network at width 16."""
        spec = data.get("specialists") if isinstance(data, dict) else None
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict):
            return data
        gen = data.get("generalist")
        base = gen.get("model") if isinstance(gen, dict) else getattr(gen, "model", None)
        base = base.model_dump() if isinstance(base, ModelConfig) else dict(base or {})
        return {**data, "specialists": {**spec, "model": {**base, **model}}}

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.clustering.max_size is not None and self.clustering.max_size < self.clustering.min_size:
            raise ValueError(f"clustering.max_size ({self.clustering.max_size}) is below clustering.min_size "
                             f"({self.clustering.min_size}); raise clustering.max_size or lower clustering.min_size")
        if self.clustering.size is not None and self.clustering.size < self.clustering.min_size:
            raise ValueError(f"clustering.size ({self.clustering.size}) is below clustering.min_size "
                             f"({self.clustering.min_size}); raise clustering.size or lower clustering.min_size")
        if self.student.init == "generalist" and not self.student.model.grows_from(self.generalist.model):
            raise ValueError("student.init=generalist starts the student from the generalist's weights, so "
                             "student.model must be generalist.model or the same network made wider (a larger "
                             "width, or larger hidden sizes); copy generalist.model into student.model "
                             "or set student.init: scratch")
        if self.specialists.model is not None and not self.specialists.model.grows_from(self.generalist.model):
            raise ValueError("specialists.model starts each specialist from the generalist's weights, so it must be "
                             "generalist.model or the same network made wider (a larger width, or larger hidden "
                             "sizes); copy generalist.model into specialists.model and raise its width, or remove "
                             "the key")
        if self.specialists.train.workers != 1:
            raise ValueError(f"specialists.train.workers={self.specialists.train.workers}: each specialist is one "
                             "Ray task on one device, and the cluster trains many at once; remove the key")
        return self

    @property
    def run_path(self) -> Path:
        """The absolute run directory, the same from any working directory (``specdistill.paths``):
        ``run_dir`` with ``~`` expanded, relative to the project home; unset, ``<home>/runs/<name>``."""
        from specdistill.paths import resolve_run_dir

        return resolve_run_dir(self.run_dir, self.name)


# Which config sections each stage depends on (its own and everything upstream). A stage's hash
# covers exactly these, so editing the student section does not redo the generalist.
STAGES = ("generalist", "clustering", "specialists", "combine", "student")
_STAGE_SECTIONS = {
    "generalist": ("seed", "data", "generalist"),
    "clustering": ("seed", "data", "generalist", "clustering"),
    "specialists": ("seed", "data", "generalist", "clustering", "specialists"),
    "combine": ("seed", "data", "generalist", "clustering", "specialists", "combine"),
    "student": ("seed", "data", "generalist", "clustering", "specialists", "combine", "student"),
}
# Options that change how a stage runs but not what it produces (combine.rivals adds records beside the
# ensemble and is added to a finished combine stage without redoing it).
_VOLATILE = {"ray_address", "num_threads", "num_gpus_per_task", "num_cpus_per_task", "max_retries",
             "eval_batch_size", "cache_dir", "load_data_on_workers", "loader_workers", "workers", "use_gpu",
             "memory_limit_mb", "rivals", "cross_fit"}
# train.workers / use_gpu are among them: the same model, data, global batch, schedule and epochs on
# more devices; the weights differ only as run-to-run noise does (batch-norm statistics and
# augmentation draws per worker's share, float reduction order), like num_threads. So a generalist
# trained on one GPU is not retrained because the next command asks for eight. TRAIN_RUNTIME_KEYS
# leaves them out of checkpoint fingerprints and student run keys too, so a checkpoint written with
# one worker count resumes with another.
TRAIN_RUNTIME_KEYS = frozenset({"workers", "use_gpu"})


# Keys added after run-directory format 2 whose default changes nothing: left out of the hash while
# at that default, so run directories finished before they existed stay finished.
_NEUTRAL_DEFAULTS: dict[str, Any] = {"mean": None, "std": None, "weights": None, "model": None,
                                     # stored predictions: dense as before wherever they are small
                                     "predictions": "auto", "predictions_top_k": 64,
                                     "dense_predictions_limit_mb": 1024.0,
                                     "eval_limit": None, "alternatives": True,
                                     "max_size": None, "weighting": "equal",
                                     # clustering.temperature; every other section's temperature is a float
                                     "temperature": None,
                                     "confusion_fraction": 0.0, "confusion_top_n": 1, "head_epochs": 0,
                                     "teacher_view": "cached", "init": "scratch", "calibrate_ensemble": False,
                                     "mixup": 0.0}
# data options only natural-image sources read; their recipe changed with them (crop + flip instead
# of the glyph jitter), so for those sources they stay in the hash and older runs are redone
_NATURAL_ONLY: dict[str, Any] = {"crop_scale": [0.08, 1.0], "stream": "auto"}
NATURAL_SOURCES = ("imagefolder", "cifar100")   # photographs (crop + flip); the other sources are glyphs


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items()
                if k not in _VOLATILE and not (k in _NEUTRAL_DEFAULTS and v == _NEUTRAL_DEFAULTS[k])}
    return obj


def stage_hash(cfg: Config, stage: str) -> str:
    """A short hash of the config sections that determine a stage's outputs."""
    dumped = cfg.model_dump(mode="json")
    if cfg.data.source not in NATURAL_SOURCES:
        dumped["data"] = {k: v for k, v in dumped["data"].items() if k not in _NATURAL_ONLY}
    relevant = {key: _strip_volatile(dumped[key]) for key in _STAGE_SECTIONS[stage]}
    return digest_json(relevant)


def config_hash(cfg: Config) -> str:
    return stage_hash(cfg, "student")


# ----------------------------------------------------------------------------------------------
# Loading, overrides and one-line errors


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise SpecdistillError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML (``3``, ``true``)."""
    tree: dict = {}
    for item in items or []:
        if "=" not in item:
            raise SpecdistillError(f"--set {item!r}: expected KEY=VALUE, e.g. --set generalist.train.epochs=3")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_value(raw))
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: dict, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        section: Any = model
        for part in error["loc"][:-1]:
            field = section.model_fields.get(str(part)) if hasattr(section, "model_fields") else None
            section = _section_type(field.annotation) if field else None
        allowed = ", ".join(sorted(section.model_fields)) if section else "?"
        return f"unknown key '{loc}'; allowed keys here: {allowed}"
    if not error["loc"]:   # a check across fields (Config._check): its message names them and the fix
        return str(error["msg"]).removeprefix("Value error, ")
    got = repr(error.get("input"))
    return f"'{loc}': {error['msg']} (got {got if len(got) <= 80 else got[:77] + '...'})"


def _section_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):  # Optional[Section]
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def validate_config(tree: dict, source: str = "config", origins: dict[str, str] | None = None) -> Config:
    """Validate a config tree; the one error line names where the bad value came from: ``source``
    (the file), or ``origins[key]`` for a key set on the command line (``"--set clustering.k=0"``)."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise SpecdistillError(f"{_origin(first['loc'], source, origins)}: {_describe(first, Config)}{more}") from None


def _origin(loc: tuple, source: str, origins: dict[str, str] | None) -> str:
    dotted = ".".join(str(p) for p in loc)
    for key, where in reversed(list((origins or {}).items())):   # the last setting of a key wins
        if dotted and (dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + ".")):
            return where
    return source


def apply_flags(cfg: Config, flags: dict[str, tuple[str, Any]]) -> Config:
    """``cfg`` with a stage's own flags applied, e.g. ``{"clustering.k": ("--k", "0")}`` (values parsed
    as YAML, like ``--set``); a bad value is blamed on the flag, not on the config file."""
    tree = cfg.model_dump(mode="json")
    origins = {}
    for key, (flag, raw) in flags.items():
        _set_dotted(tree, key, _parse_value(raw))
        origins[key] = f"{flag} {raw}"
    return validate_config(tree, "the command line", origins)


def _parse_value(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        return raw


def read_config_file(path: Path) -> dict:
    """The YAML mapping in ``path``; every way a file can be unusable is one line naming the fix."""
    if not path.exists():
        raise SpecdistillError(f"config file {path} not found; see configs/ for examples")
    if path.is_dir():
        raise SpecdistillError(f"config {path} is a folder; pass a YAML file, e.g. configs/quickstart.yaml")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpecdistillError(f"cannot read config {path} ({exc.strerror}); check its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SpecdistillError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                               "save the file as UTF-8") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecdistillError(f"{path}{_yaml_where(exc)}: not valid YAML: {_yaml_problem(exc)}; "
                               "fix the YAML there") from None
    if tree is None:
        raise SpecdistillError(f"{path} is empty; write the experiment in it (see configs/quickstart.yaml), "
                               "or give no config to run the defaults")
    if not isinstance(tree, dict):
        raise SpecdistillError(f"{path}: expected a mapping of sections at the top level")
    return tree


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    if problem is None:
        return str(exc).splitlines()[0]
    context, mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and mark is not None:
        return f"{problem} ({context} that starts at line {mark.line + 1}, column {mark.column + 1})"
    return f"{problem} ({context})" if context else problem


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply ``--set`` overrides, and validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        tree = read_config_file(path)
        source = str(path)
    tree = _merge(tree, parse_overrides(overrides))
    origins = {item.split("=", 1)[0].strip(): f"--set {item}" for item in overrides or []}
    return validate_config(tree, source, origins)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
