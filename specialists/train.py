"""Train one specialist: a pure function of the generalist, a group and the data arrays.

:func:`train_one` is what a Ray task runs, so it takes plain values (numpy arrays, dicts, a config)
and returns plain values (numpy weights, metrics); the driver writes the files. Steps:

1. rebuild the generalist and fit the specialist's head from it (:func:`make_specialist`), on
   backbone features of a half-group / half-other sample of training images;
2. train with :func:`specdistill.engine.fit` on half/half batches (:class:`SpecialistBatchSampler`;
   with ``confusion_fraction`` part of the dustbin half comes from the generalist's confusions into
   the group, ``data["train_top"]``), early stopping on held-out examples of the group plus dustbin
   examples in the same proportion as the training batches (so the held-out score measures what the
   batches teach); with ``head_epochs`` the new head alone trains first, on frozen features;
3. optionally add soft targets from the generalist folded onto group + dustbin (paper section 6.1),
   shifted to the training prior so that one dustbin correction fits both loss terms;
4. measure on held-out data: accuracy within the group against the generalist's on the same
   examples, and on a natural-distribution sample the folded NLL with and without the correction.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from specdistill.config import Config, ModelConfig
from specdistill.data import Split
from specdistill.data.loading import training_batches
from specdistill.engine import fit, predict_logits, resolve_device
from specdistill.errors import SpecdistillError
from specdistill.kd import build_loss
from specdistill.models import Classifier, build_model, count_flops, widen_from
from specialists.dustbin import confusion_correction, corrected_log_probs, dustbin_correction, group_share
from specialists.model import as_class_index, fold_logits, make_specialist
from specialists.sampler import SpecialistBatchSampler, confusion_indices, fold_labels

INIT_EXAMPLES = 2048      # examples whose features fit the dustbin row at initialisation
NATURAL_EVAL = 4096       # held-out examples (natural class mix) for the folded NLL / dustbin metrics


def classifier_from_state(state: dict[str, Any]) -> Classifier:
    """Rebuild a classifier from ``{"tensors": {name: array}, "meta": {...}}`` (save_classifier's meta)."""
    meta = state["meta"]
    model = build_model(ModelConfig(**meta["model"]), meta["num_classes"], meta["channels"], meta["image_size"])
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state["tensors"].items()})
    return model.eval()


def specialist_base(generalist: Classifier, generalist_meta: dict[str, Any],
                    model: ModelConfig | None) -> tuple[Classifier, float]:
    """The network a specialist starts from and its multiply-adds per image over the generalist's: the
    generalist itself, or (``specialists.model``) the same network made wider, computing the same function
    (``models.widen_from``), its extra channels free to learn the group's fine distinctions."""
    if model is None or model == ModelConfig(**generalist_meta["model"]):
        return generalist, 1.0
    channels, size = generalist_meta["channels"], generalist_meta["image_size"]
    net = build_model(model.model_copy(update={"pretrained": False}), generalist.num_classes, channels, size)
    wide = widen_from(net, generalist.state_dict()).eval()
    return wide, count_flops(wide, channels, size) / count_flops(generalist, channels, size)


@torch.no_grad()
def backbone_features(model: Classifier, images: np.ndarray, device: torch.device,
                      batch_size: int = 512) -> torch.Tensor:
    from specdistill.data.loading import to_float

    model = model.to(device).eval()
    out = [model.features(to_float(torch.as_tensor(images[i:i + batch_size]).to(device))).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def generalist_top_n(generalist_state: dict[str, Any], images: np.ndarray, n: int, device: torch.device | str,
                     batch_size: int = 512) -> np.ndarray:
    """[N, n] int32: the generalist's n most probable classes per (unaugmented) image, best first:
    which specialists an image activates (``specialists.confusion_fraction``)."""
    model = classifier_from_state(generalist_state).to(device)
    out = []
    for start in range(0, len(images), 8 * batch_size):
        logits = predict_logits(model, images[start:start + 8 * batch_size], batch_size, device)
        out.append(logits.topk(min(n, logits.shape[1]), dim=1).indices.to(torch.int32).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, n), np.int32)


def _balanced_sample(rng: np.random.Generator, inside: np.ndarray, count: int,
                     fraction: float) -> np.ndarray:
    """Indices: about ``fraction`` of ``count`` from ``inside`` examples, the rest from the others."""
    group, other = np.flatnonzero(inside), np.flatnonzero(~inside)
    n_group = min(len(group), round(count * fraction))
    n_other = min(len(other), round(n_group * (1 - fraction) / fraction)) if n_group else min(len(other), count)
    return np.concatenate([rng.choice(group, n_group, replace=False), rng.choice(other, n_other, replace=False)])


def soft_target_objective(teacher: Classifier, classes: torch.Tensor, correction: float,
                          temperature: float, alpha: float):
    """``alpha T^2 KL(teacher_T || specialist_T) + (1 - alpha) CE`` with the generalist folded.

    The generalist knows the natural prior; the batches do not. Its folded dustbin logit is
    lowered by the correction (i.e. moved to the training prior), so the soft and hard terms agree
    on what the dustbin means and the correction applied after training stays right for both.
    """
    loss = build_loss("hinton", temperature=temperature, alpha=alpha)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def objective(model, images, labels, index):
        logits = model(images)
        with torch.no_grad():
            target = fold_logits(teacher(images).float(), classes.to(images.device))
            target[:, -1] -= correction
        return logits, loss(logits, target, labels)

    return objective


@torch.no_grad()
def _held_out_metrics(generalist_logits: torch.Tensor, specialist_logits: torch.Tensor,
                      labels: np.ndarray, classes: torch.Tensor, correction: float) -> dict[str, float]:
    """Scores on held-out examples; ``labels`` are global class ids."""
    local = torch.as_tensor(fold_labels(labels, classes.numpy()))
    folded_g = torch.log_softmax(fold_logits(generalist_logits, classes), dim=1)
    corrected = corrected_log_probs(specialist_logits, correction)
    raw = torch.log_softmax(specialist_logits.float(), dim=1)
    return {
        "nll_generalist": float(F.nll_loss(folded_g, local)),
        "nll_specialist": float(F.nll_loss(corrected, local)),
        "nll_specialist_uncorrected": float(F.nll_loss(raw, local)),
        "acc_generalist": float((folded_g.argmax(1) == local).float().mean()),
        "acc_specialist": float((corrected.argmax(1) == local).float().mean()),
        "acc_specialist_uncorrected": float((raw.argmax(1) == local).float().mean()),
        "dustbin_mae": float((corrected[:, -1].exp() - folded_g[:, -1].exp()).abs().mean()),
    }


def _group_accuracy(logits: torch.Tensor, local: torch.Tensor) -> float:
    return float((logits.argmax(1) == local).float().mean()) if len(local) else float("nan")


def train_one(generalist_state: dict[str, Any], group: dict[str, Any], data: dict[str, np.ndarray],
              cfg: Config, device: torch.device | str | None = None, work_dir: str | os.PathLike | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Train the specialist for ``group`` (``{"id", "classes", "names"}``) and return weights + metrics.

    ``generalist_state`` is ``{"tensors": {name: array}, "meta": generalist meta}``; ``data`` holds
    ``train_images``, ``train_labels``, ``val_images``, ``val_labels`` (uint8 images, int64 labels);
    for a streamed image folder the images are ``FolderImages`` (file paths only), and this task
    reads just the files it samples: its group, the dustbin half and its held-out rows.
    With ``work_dir`` the engine checkpoints every epoch there and resumes an interrupted run.
    """
    scfg = cfg.specialists
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    generalist = classifier_from_state(generalist_state)
    classes = as_class_index(group["classes"], generalist.num_classes)
    seed = cfg.seed * 100_003 + int(group["id"])
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    train = Split(data["train_images"], data["train_labels"])
    val = Split(data["val_images"], data["val_labels"])

    confusions = None
    if scfg.confusion_fraction > 0:   # activation-matched dustbin: the generalist's confusions into the group
        if "train_top" not in data:
            raise SpecdistillError("specialists.confusion_fraction > 0 needs the generalist's top-n on the training "
                                   "split (data['train_top']: generalist_top_n)")
        confusions = confusion_indices(train.labels, data["train_top"], classes.numpy())
    sampler = SpecialistBatchSampler(train.labels, classes.numpy(), scfg.train.batch_size,
                                     scfg.specialist_fraction, seed, confusions, scfg.confusion_fraction)
    share = group_share(train.labels, classes.numpy())
    correction = (dustbin_correction(sampler.training_fraction, share)
                  - confusion_correction(sampler.confusion_share, sampler.confusion_rate))

    inside_train = np.isin(train.labels, classes.numpy())
    init_idx = _balanced_sample(rng, inside_train, INIT_EXAMPLES, sampler.training_fraction)
    gmeta = generalist_state["meta"]
    base, macs_ratio = specialist_base(generalist, gmeta, scfg.model)
    features = backbone_features(base, train.subset(init_idx).images, device, scfg.train.eval_batch_size)
    specialist = make_specialist(base, classes, features, dustbin_init=scfg.dustbin_init)
    if scfg.freeze_backbone:
        for p in specialist.backbone.parameters():
            p.requires_grad_(False)

    # held-out: every group example, plus dustbin examples in the training batches' proportion
    inside_val = np.isin(val.labels, classes.numpy())
    stop_idx = _balanced_sample(rng, inside_val, int(inside_val.sum() / sampler.training_fraction) + 1,
                                sampler.training_fraction) if inside_val.any() else np.zeros(0, np.int64)
    early_stop = Split(val.subset(stop_idx).images, fold_labels(val.labels[stop_idx], classes.numpy())) \
        if len(stop_idx) else None
    natural_idx = np.sort(rng.choice(len(val), min(len(val), NATURAL_EVAL), replace=False))
    group_val = np.flatnonzero(inside_val)
    eval_idx = np.union1d(natural_idx, group_val)
    eval_images, eval_labels = val.subset(eval_idx).images, val.labels[eval_idx]
    in_natural = np.isin(eval_idx, natural_idx)
    in_group = np.isin(eval_labels, classes.numpy())
    local_group = torch.as_tensor(fold_labels(eval_labels[in_group], classes.numpy()))

    bs = scfg.train.eval_batch_size
    gen_logits = predict_logits(generalist, eval_images, bs, device)
    init_logits = predict_logits(specialist, eval_images, bs, device)

    objective = None
    if scfg.soft_targets.enabled:
        teacher = classifier_from_state(generalist_state).to(device)
        objective = soft_target_objective(teacher, classes, correction, scfg.soft_targets.temperature,
                                          scfg.soft_targets.alpha)
    # a streamed split: the loader's workers read only the files of the sampled batches
    loader, augment = training_batches(train, cfg.data, seed=seed, labels=fold_labels(train.labels, classes.numpy()),
                                       sampler=sampler, device=device)
    fingerprint = f"specialist:{group['id']}:{classes.tolist()}:{correction:.6f}"
    head_phase = None
    if scfg.head_epochs and not scfg.freeze_backbone:   # the new head first, on the generalist's features
        backbone = [p for p in specialist.backbone.parameters() if p.requires_grad]
        for p in backbone:
            p.requires_grad_(False)
        head_train = scfg.train.model_copy(update={"epochs": scfg.head_epochs, "patience": None})
        head_phase = fit(specialist, loader, early_stop, head_train,
                         None if work_dir is None else os.path.join(work_dir, "head"), objective=objective,
                         seed=seed, desc=f"specialist {group['id']} head", device=device, augment=augment,
                         progress=progress, fingerprint=fingerprint + ":head")
        for p in backbone:
            p.requires_grad_(True)
    result = fit(specialist, loader, early_stop, scfg.train, work_dir, objective=objective, seed=seed,
                 desc=f"specialist {group['id']}", device=device, augment=augment, progress=progress,
                 fingerprint=fingerprint)
    if head_phase is not None:   # the compute of both phases
        result["head_epochs"] = head_phase["epochs_run"]
        for key in ("images_seen", "train_seconds"):
            result[key] += head_phase[key]
    spec_logits = predict_logits(specialist, eval_images, bs, device)

    group_slice = slice(0, len(classes))
    metrics: dict[str, Any] = {
        "val_group_examples": int(in_group.sum()),
        "generalist_group_acc": _group_accuracy(gen_logits[in_group][:, classes], local_group),
        "init_group_acc": _group_accuracy(init_logits[in_group][:, group_slice], local_group),
        "specialist_group_acc": _group_accuracy(spec_logits[in_group][:, group_slice], local_group),
        "natural_examples": int(in_natural.sum()),
        "init": _held_out_metrics(gen_logits[in_natural], init_logits[in_natural], eval_labels[in_natural],
                                  classes, 0.0),
        "trained": _held_out_metrics(gen_logits[in_natural], spec_logits[in_natural], eval_labels[in_natural],
                                     classes, correction),
        **{k: v for k, v in result.items() if k != "history"},
    }
    metrics["group_acc_gain"] = metrics["specialist_group_acc"] - metrics["generalist_group_acc"]
    metrics["macs_ratio"] = macs_ratio   # its multiply-adds per image over the generalist's (the rivals' compute)
    if confusions is not None:
        metrics["confusions"] = {"examples": len(confusions), "rate": sampler.confusion_rate,
                                 "share_of_dustbin": sampler.confusion_share}
    return {
        "id": int(group["id"]), "classes": classes.tolist(), "names": list(group.get("names") or []),
        "tensors": {k: v.detach().cpu().numpy() for k, v in specialist.state_dict().items()},
        "model_meta": {"model": gmeta["model"] if scfg.model is None else scfg.model.model_dump(mode="json"),
                       "num_classes": len(classes) + 1,
                       "channels": gmeta["channels"], "image_size": gmeta["image_size"]},
        "dustbin_correction": correction, "group_share": share,
        "training_fraction": sampler.training_fraction, "metrics": metrics,
    }

