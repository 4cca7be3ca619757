"""The one training loop every stage uses (generalist, specialists, student).

What it adds over a bare PyTorch loop, each because a long run on a shared cluster needs it:
a per-step learning-rate schedule from the config, AMP and channels_last on CUDA, a tqdm bar
(loss, accuracy, images/s), one JSONL line of metrics per epoch, early stopping on held-out
accuracy with the best weights restored, and a checkpoint per epoch written atomically so a killed
run started again continues where it stopped and ends with the same weights it would have had.

The loss comes from an ``objective(model, images, labels, index) -> (logits, {name: loss})``
(mdistiller's shape), so distillation losses plug in without touching the loop.

``fit`` reads as its steps (the shape of torchvision's references/classification): prepare the
model and optimizer, start or resume from the checkpoint, then per epoch ``train_one_epoch``,
``evaluate`` on held-out data, keep the best weights (early stopping) and save the epoch.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from specdistill.artifacts import load_weights, save_weights, write_text
from specdistill.config import TRAIN_RUNTIME_KEYS, TrainConfig
from specdistill.data import Split
from specdistill.data.loading import to_float
from specdistill.errors import SpecdistillError
from specdistill.hashing import digest_json
from specdistill.rundir import METRICS

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
CHECKPOINT = "checkpoint.safetensors"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecdistillError("device: cuda was asked for but no CUDA GPU is visible; use device: auto or cpu")
    return torch.device(name)


def cross_entropy_objective(label_smoothing: float = 0.0) -> Objective:
    def objective(model, images, labels, index):
        logits = model(images)
        return logits, {"ce": F.cross_entropy(logits, labels, label_smoothing=label_smoothing)}

    return objective


def lr_factor(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then the configured decay."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":  # x0.1 at 50% and 75% of training
        return 0.1 ** (int(progress >= 0.5) + int(progress >= 0.75))
    if cfg.schedule == "onecycle":
        return min(1.0, progress / 0.3) if progress < 0.3 else 0.5 * (1 + math.cos(math.pi * (progress - 0.3) / 0.7))
    return 1.0


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # no weight decay on biases and norm parameters
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


# ----------------------------------------------------------------------------------------------
# Evaluation and prediction


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 512,
                   device: torch.device | str | None = None, progress: bool = False) -> torch.Tensor:
    """Logits for uint8 images, in batches, as a float32 CPU tensor.

    ``images`` is only ever sliced, so a streamed split (``data.stream.FolderImages``) is decoded a
    batch at a time (the next one read ahead while the model runs), never whole. A floating-point
    tensor is taken as already normalised ``[B, C, H, W]`` (e.g. the student's augmented batch).
    """
    first = next(model.parameters(), None)
    device = torch.device(device) if device is not None else first.device if first is not None else torch.device("cpu")
    if first is None or first.device != device:   # moving costs a walk over every tensor, even when in place
        model = model.to(device)
    model.eval()
    normalised = isinstance(images, torch.Tensor) and images.is_floating_point()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", disable=not progress, leave=False):
        batch = torch.as_tensor(images[start:start + batch_size]).to(device)
        x = batch if normalised else to_float(batch)
        with _autocast(device):
            out.append(model(x).float().cpu())
    if not out:
        return torch.zeros(0, getattr(model, "num_classes", 0))
    return torch.cat(out)


def predict_log_probs(model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 512,
                      device: torch.device | str | None = None, progress: bool = False) -> np.ndarray:
    """Log-probabilities (float32 [N, K]) for uint8 images; what the run directory stores."""
    return torch.log_softmax(predict_logits(model, images, batch_size, device, progress), dim=1).numpy()


_EVALUATE_WHOLE_BYTES = 256 * 2**20   # above this, [N, K] logits are never held whole (K = 15,000)


def evaluate(model: nn.Module, split: Split, batch_size: int = 512, device=None,
             hits: bool = False) -> dict[str, Any]:
    """Mean cross-entropy ``loss`` and top-1 ``acc`` on ``split``; with ``hits``, also ``hits``: a bool
    array saying which examples the model gets right (for paired comparisons on the same examples)."""
    n, num_classes = len(split.labels), int(getattr(model, "num_classes", 0) or 0)
    if 4 * n * num_classes > _EVALUATE_WHOLE_BYTES:
        return _evaluate_in_blocks(model, split, batch_size, device, hits)
    logits = predict_logits(model, split.images, batch_size, device)
    labels = torch.as_tensor(split.labels)
    right = logits.argmax(1) == labels
    return {"loss": float(F.cross_entropy(logits, labels)) if len(labels) else float("nan"),
            "acc": float(right.float().mean()) if len(labels) else float("nan"),
            **({"hits": right.numpy()} if hits else {})}


def _evaluate_in_blocks(model: nn.Module, split: Split, batch_size: int, device, hits: bool) -> dict[str, Any]:
    """As :func:`evaluate`, a block of rows at a time (the loss summed in float64)."""
    loss, n, right = 0.0, len(split.labels), []
    for start in range(0, n, batch_size):
        logits = predict_logits(model, split.images[start:start + batch_size], batch_size, device)
        labels = torch.as_tensor(split.labels[start:start + batch_size])
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        right.append((logits.argmax(1) == labels).numpy())
    right_all = np.concatenate(right)
    return {"loss": loss / n, "acc": float(right_all.mean()), **({"hits": right_all} if hits else {})}


def _interactive() -> bool:
    """A terminal gets a lively bar; a log file (CI, nohup) gets a line every 30 s, not every step."""
    import sys

    return sys.stderr.isatty()


def _autocast(device: torch.device, enabled: bool = True):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file holding model, optimizer, best weights and loop state


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _fingerprint(model: nn.Module, cfg: TrainConfig, extra: str) -> str:
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    # where it trains (workers, GPUs) is left out: a checkpoint resumes on another worker count
    return digest_json([cfg.model_dump(mode="json", exclude=set(TRAIN_RUNTIME_KEYS)), shapes, extra])


def _save_checkpoint(path: Path, model, opt, best_state, loop: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best_state.items()})
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    save_weights(path, tensors, {"loop": loop, "optimizer": opt_meta})


# ----------------------------------------------------------------------------------------------
# One fit, as a sequence of steps (the shape of torchvision's references/classification)


@dataclass(frozen=True)
class FitSetup:
    """What stays fixed for every epoch of one ``fit``."""

    cfg: TrainConfig
    device: torch.device
    objective: Objective
    steps_per_epoch: int
    augment: nn.Module | None = None
    desc: str = "train"
    progress: bool = True
    rank: int = 0          # this worker and how many there are, under data-parallel training
    world: int = 1         # (specdistill.distributed); 0 and 1 for a single process

    @property
    def channels_last(self) -> bool:
        # channels_last pays on CUDA convolutions; on CPU it only costs copies
        return self.cfg.channels_last and self.device.type == "cuda"

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs


def _steps_per_epoch(train_batches: DataLoader, cfg: TrainConfig, desc: str) -> int:
    steps = len(train_batches)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps == 0:
        raise SpecdistillError(f"{desc}: the training split is empty; check the data source and data.limit")
    return steps


def _prepare(model: nn.Module, setup: FitSetup) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """Move the model to its device (and memory format); make its optimizer and AMP loss scaler.

    The scaler only scales with float16 autocast; bfloat16, where the GPU has it, needs none.
    """
    model.to(setup.device)
    if setup.channels_last:
        model.to(memory_format=torch.channels_last)
    cuda = setup.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and setup.cfg.amp and not torch.cuda.is_bf16_supported())
    return make_optimizer(model, setup.cfg), scaler


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def foreign_checkpoint(ckpt: Path) -> SpecdistillError:
    return SpecdistillError(f"{ckpt} was written by a different model or training config; delete {ckpt.parent} "
                            "(or pass --force) to start this training over")


def _start_or_resume(out: Path | None, model: nn.Module, opt: torch.optim.Optimizer, fingerprint: str,
                     setup: FitSetup) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The loop state and best weights to start from: fresh, or those of the checkpoint in ``out``.

    The checkpoint also puts back the model, the optimizer and torch's RNG, so a killed run started
    again ends with the weights it would have had; one written for another model, config or
    ``fingerprint`` is refused rather than silently mixed in.
    """
    ckpt = out / CHECKPOINT if out is not None else None
    if ckpt is None or not ckpt.exists():
        loop = {"epoch": 0, "best_acc": -1.0, "best_loss": float("inf"), "best_epoch": -1,
                "bad_epochs": 0, "history": [], "fingerprint": fingerprint, "stopped_early": False}
        return loop, _clone_state(model)
    tensors, meta = load_weights(ckpt)
    if meta.get("loop", {}).get("fingerprint") != fingerprint:
        raise foreign_checkpoint(ckpt)
    loop = meta["loop"]
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best_state = {k[5:]: v.to(setup.device) for k, v in tensors.items() if k.startswith("best.")}
    _restore_optimizer(opt, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    if setup.progress and loop["epoch"] < setup.cfg.epochs and not loop["stopped_early"]:
        tqdm.write(f"{setup.desc}: resuming from {ckpt} after epoch {loop['epoch']}")
    return loop, best_state


def _save_epoch(out: Path | None, model: nn.Module, opt: torch.optim.Optimizer,
                best_state: dict[str, torch.Tensor], loop: dict[str, Any]) -> None:
    """Checkpoint and metrics after each epoch (each file atomic), so a kill loses one epoch at most."""
    if out is None:
        return
    _save_checkpoint(out / CHECKPOINT, model, opt, best_state, loop)
    write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in loop["history"]))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, setup: FitSetup,
                batch: tuple, aug_gen: torch.Generator, where: str) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One optimisation step on one batch; returns the logits, the named losses and the labels."""
    images, labels, index = batch
    x = to_float(images.to(setup.device, non_blocking=True))
    if setup.augment is not None:
        x = setup.augment(x, aug_gen)
    if setup.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = labels.to(setup.device, non_blocking=True)
    with _autocast(setup.device, setup.cfg.amp):
        logits, losses = setup.objective(model, x, labels, index)
        loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise SpecdistillError(f"{setup.desc}: the loss became {float(loss.detach())} at {where}; "
                               "lower the learning rate (train.lr) or check the data")
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return logits, losses, labels


def _sum_over_workers(seen: int, correct: Any, sums: dict[str, Any],
                      device: torch.device) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """An epoch's example count, correct count and loss sums added up over every data-parallel
    worker (one all-reduce), so each worker's record describes the whole epoch."""
    import torch.distributed as dist

    names = list(sums)
    totals = torch.stack([torch.as_tensor(float(seen), dtype=torch.float64, device=device),
                          torch.as_tensor(correct, device=device).double(),
                          *[torch.as_tensor(sums[name], device=device).double() for name in names]])
    dist.all_reduce(totals)
    return int(totals[0]), totals[1], {name: totals[2 + i] for i, name in enumerate(names)}


def train_one_epoch(model: nn.Module, train_batches: DataLoader, opt: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, setup: FitSetup, epoch: int, seed: int) -> dict[str, Any]:
    """Train one epoch and return its record (lr, train loss and accuracy, images/s).

    Dropout and augmentation draw from streams seeded by (seed, epoch), so a resumed run repeats
    exactly the epochs it would have run. Metrics add up on the device: no host sync per step.
    """
    cfg, steps = setup.cfg, setup.steps_per_epoch
    stream = setup.rank * 1_000_000_007   # each data-parallel worker its own dropout and augmentation draws
    torch.manual_seed(seed * 100_003 + epoch + stream)
    aug_gen = torch.Generator().manual_seed(seed * 100_019 + epoch + stream)
    sampler = getattr(train_batches, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    model.train()
    sums: dict[str, Any] = {}
    seen, correct = 0, 0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"{setup.desc} {epoch + 1}/{cfg.epochs}", disable=not setup.progress,
               leave=False, mininterval=1.0 if _interactive() else 30.0, dynamic_ncols=True)
    for step, batch in enumerate(train_batches):
        if step >= steps:
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, epoch * steps + step, setup.total_steps, steps)
        logits, losses, labels = _train_step(model, opt, scaler, setup, batch, aug_gen,
                                             f"epoch {epoch + 1} step {step}")
        n = len(labels)
        seen += n
        with torch.no_grad():
            correct = correct + (logits.argmax(1) == labels).sum()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * n
        bar.update(1)
        if bar.n % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{float(sum(sums.values())) / seen:.3f}", acc=f"{int(correct) / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
    bar.close()
    if setup.world > 1:
        seen, correct, sums = _sum_over_workers(seen, correct, sums, setup.device)
    sums = {name: float(value) for name, value in sums.items()}   # waits for the device's last step
    seconds = time.perf_counter() - start
    return {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
            "train_loss": sum(sums.values()) / max(seen, 1), "train_acc": int(correct) / max(seen, 1),
            **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
            "images": seen, "images_per_s": seen / seconds, "seconds": seconds}


def _keep_best(model: nn.Module, record: dict[str, Any], loop: dict[str, Any],
               best_state: dict[str, torch.Tensor], patience: int | None) -> dict[str, torch.Tensor]:
    """Early stopping: remember the best epoch's weights, count epochs since, stop after ``patience``.

    Best is the highest held-out accuracy, ties broken by lower held-out loss; with no held-out
    data every epoch is the best so far (the last weights win). Returns the best weights.
    """
    better = "val_acc" not in record or record["val_acc"] > loop["best_acc"] or (
        record["val_acc"] == loop["best_acc"] and record["val_loss"] < loop["best_loss"])
    if better:
        loop.update(best_acc=record.get("val_acc", -1.0), best_loss=record.get("val_loss", float("inf")),
                    best_epoch=record["epoch"], bad_epochs=0)
        return _clone_state(model)
    loop["bad_epochs"] += 1
    if patience is not None and loop["bad_epochs"] >= patience:
        loop["stopped_early"] = True
    return best_state


def _log_epoch(setup: FitSetup, record: dict[str, Any], stopped_early: bool) -> None:
    if setup.progress:
        tqdm.write(f"{setup.desc} epoch {record['epoch']}/{setup.cfg.epochs}: loss {record['train_loss']:.4f} "
                   f"train acc {record['train_acc']:.3f}"
                   + (f" val acc {record['val_acc']:.3f}" if "val_acc" in record else "")
                   + f" ({record['images_per_s']:.0f} img/s)"
                   + (" - early stop" if stopped_early else ""))


def _summary(loop: dict[str, Any]) -> dict[str, Any]:
    last = loop["history"][-1] if loop["history"] else {}
    return {"best_epoch": loop["best_epoch"], "best_val_acc": loop["best_acc"], "epochs_run": loop["epoch"],
            "stopped_early": loop["stopped_early"], "train_seconds": sum(r["seconds"] for r in loop["history"]),
            "images_per_s": last.get("images_per_s"), "images_seen": sum(r.get("images", 0) for r in loop["history"]),
            "history": loop["history"]}


def fit(
    model: nn.Module,
    train_batches: DataLoader,
    val: Split | None,
    cfg: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    objective: Objective | None = None,
    seed: int = 0,
    desc: str = "train",
    device: torch.device | str | None = None,
    augment: nn.Module | None = None,
    progress: bool = True,
    fingerprint: str = "",
) -> dict[str, Any]:
    """Train ``model`` in place and return the final metrics (best held-out epoch restored).

    ``train_batches`` yields ``(images uint8, labels, index)``; its sampler's ``set_epoch`` is
    called each epoch. With ``out_dir`` a checkpoint is written every epoch and an existing one is
    resumed; ``fingerprint`` names what else (data, teacher) the checkpoint must match.

    With ``cfg.workers > 1`` the same epochs run data-parallel on that many Ray Train workers
    (``specdistill.distributed``), with the same checkpoint, metrics and result.
    """
    if cfg.workers > 1:
        from specdistill.distributed import fit_distributed

        return fit_distributed(model, train_batches, val, cfg, out_dir, objective, seed, desc, device,
                               augment, progress, fingerprint)
    device = resolve_device("auto") if device is None else torch.device(device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    setup = FitSetup(cfg, device, objective or cross_entropy_objective(cfg.label_smoothing),
                     _steps_per_epoch(train_batches, cfg, desc), augment, desc, progress)
    opt, scaler = _prepare(model, setup)
    out = Path(out_dir) if out_dir is not None else None
    loop, best_state = _start_or_resume(out, model, opt, _fingerprint(model, cfg, fingerprint), setup)
    while loop["epoch"] < cfg.epochs and not loop["stopped_early"]:
        record = train_one_epoch(model, train_batches, opt, scaler, setup, loop["epoch"], seed)
        if val is not None and len(val):
            scores = evaluate(model, val, cfg.eval_batch_size, device)
            record.update(val_loss=scores["loss"], val_acc=scores["acc"])
        best_state = _keep_best(model, record, loop, best_state, cfg.patience)
        loop["history"].append(record)
        loop["epoch"] = record["epoch"]
        _log_epoch(setup, record, loop["stopped_early"])
        _save_epoch(out, model, opt, best_state, loop)
    model.load_state_dict(best_state)
    model.eval()
    return _summary(loop)
