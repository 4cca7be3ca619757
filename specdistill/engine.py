"""The one training loop every stage uses (generalist, specialists, student).

What it adds over a bare PyTorch loop, each because a long run on a shared cluster needs it:
a per-step learning-rate schedule from the config, AMP and channels_last on CUDA, a tqdm bar
(loss, accuracy, images/s), one JSONL line of metrics per epoch, early stopping on held-out
accuracy with the best weights restored, and a checkpoint per epoch written atomically so a killed
run started again continues where it stopped and ends with the same weights it would have had.

The loss comes from an ``objective(model, images, labels, index) -> (logits, {name: loss})``
(mdistiller's shape), so distillation losses plug in without touching the loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from specdistill.artifacts import load_weights, save_weights, write_text
from specdistill.config import TrainConfig
from specdistill.data import Split
from specdistill.data.loading import to_float
from specdistill.errors import SpecdistillError

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"


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
    """Logits for uint8 images, in batches, as a float32 CPU tensor."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    images = torch.as_tensor(images)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", disable=not progress, leave=False):
        x = to_float(images[start:start + batch_size].to(device))
        with _autocast(device):
            out.append(model(x).float().cpu())
    if not out:
        return torch.zeros(0, getattr(model, "num_classes", 0))
    return torch.cat(out)


def predict_log_probs(model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 512,
                      device: torch.device | str | None = None, progress: bool = False) -> np.ndarray:
    """Log-probabilities (float32 [N, K]) for uint8 images; what the run directory stores."""
    return torch.log_softmax(predict_logits(model, images, batch_size, device, progress), dim=1).numpy()


def evaluate(model: nn.Module, split: Split, batch_size: int = 512, device=None) -> dict[str, float]:
    logits = predict_logits(model, split.images, batch_size, device)
    labels = torch.as_tensor(split.labels)
    return {"loss": float(F.cross_entropy(logits, labels)) if len(labels) else float("nan"),
            "acc": float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")}


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
    blob = json.dumps([cfg.model_dump(mode="json"), shapes, extra], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, model, opt, best_state, loop: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best_state.items()})
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    save_weights(path, tensors, {"loop": loop, "optimizer": opt_meta})


# ----------------------------------------------------------------------------------------------


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
    """
    device = resolve_device("auto") if device is None else torch.device(device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    objective = objective or cross_entropy_objective(cfg.label_smoothing)
    channels_last = cfg.channels_last and device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp
                                  and not torch.cuda.is_bf16_supported())
    steps_per_epoch = len(train_batches)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise SpecdistillError(f"{desc}: the training split is empty; check the data source and data.limit")
    total_steps = steps_per_epoch * cfg.epochs

    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / CHECKPOINT if out is not None else None
    fp = _fingerprint(model, cfg, fingerprint)
    loop: dict[str, Any] = {"epoch": 0, "best_acc": -1.0, "best_loss": float("inf"), "best_epoch": -1,
                            "bad_epochs": 0, "history": [], "fingerprint": fp, "stopped_early": False}
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    if ckpt is not None and ckpt.exists():
        tensors, meta = load_weights(ckpt)
        if meta.get("loop", {}).get("fingerprint") != fp:
            raise SpecdistillError(
                f"{ckpt} was written by a different model or training config; delete {out} "
                "(or pass --force) to start this training over"
            )
        loop = meta["loop"]
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best_state = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
        _restore_optimizer(opt, tensors, meta["optimizer"])
        torch.set_rng_state(tensors["rng.torch"])
        if progress and loop["epoch"] < cfg.epochs and not loop["stopped_early"]:
            tqdm.write(f"{desc}: resuming from {ckpt} after epoch {loop['epoch']}")

    sampler = getattr(train_batches, "sampler", None)
    while loop["epoch"] < cfg.epochs and not loop["stopped_early"]:
        epoch = loop["epoch"]
        torch.manual_seed(seed * 100_003 + epoch)          # dropout etc.: same stream after resume
        aug_gen = torch.Generator().manual_seed(seed * 100_019 + epoch)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        seen = correct = 0
        start = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False, mininterval=1.0 if _interactive() else 30.0, dynamic_ncols=True)
        for step, (images, labels, index) in enumerate(train_batches):
            if step >= steps_per_epoch:
                break
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, epoch * steps_per_epoch + step, total_steps, steps_per_epoch)
            x = to_float(images.to(device, non_blocking=True))
            if augment is not None:
                x = augment(x, aug_gen)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with _autocast(device, cfg.amp):
                logits, losses = objective(model, x, labels, index)
                loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise SpecdistillError(f"{desc}: the loss became {float(loss.detach())} at epoch {epoch + 1} "
                                       f"step {step}; "
                                       "lower the learning rate (train.lr) or check the data")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            n = len(labels)
            seen += n
            with torch.no_grad():  # accumulate on the device: no host sync per step
                correct = correct + (logits.argmax(1) == labels).sum()
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() * n
            bar.update(1)
            if bar.n % 20 == 0 or step == steps_per_epoch - 1:
                rate = seen / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{float(sum(sums.values())) / seen:.3f}",
                                acc=f"{int(correct) / seen:.3f}", img_s=f"{rate:.0f}", refresh=False)
        bar.close()
        sums = {name: float(value) for name, value in sums.items()}
        correct = int(correct)
        seconds = time.perf_counter() - start
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                                  "train_loss": sum(sums.values()) / max(seen, 1),
                                  "train_acc": correct / max(seen, 1),
                                  **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
                                  "images_per_s": seen / seconds, "seconds": seconds}
        if val is not None and len(val):
            scores = evaluate(model, val, cfg.eval_batch_size, device)
            record.update(val_loss=scores["loss"], val_acc=scores["acc"])
            better = scores["acc"] > loop["best_acc"] or (
                scores["acc"] == loop["best_acc"] and scores["loss"] < loop["best_loss"])
        else:
            better = True
        if better:
            loop.update(best_acc=record.get("val_acc", -1.0), best_loss=record.get("val_loss", float("inf")),
                        best_epoch=epoch + 1, bad_epochs=0)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            loop["bad_epochs"] += 1
            if cfg.patience is not None and loop["bad_epochs"] >= cfg.patience:
                loop["stopped_early"] = True
        loop["history"].append(record)
        loop["epoch"] = epoch + 1
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                       f"train acc {record['train_acc']:.3f}"
                       + (f" val acc {record['val_acc']:.3f}" if "val_acc" in record else "")
                       + f" ({record['images_per_s']:.0f} img/s)"
                       + (" - early stop" if loop["stopped_early"] else ""))
        if out is not None:
            _save_checkpoint(ckpt, model, opt, best_state, loop)
            write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in loop["history"]))

    model.load_state_dict(best_state)
    model.eval()
    last = loop["history"][-1] if loop["history"] else {}
    return {"best_epoch": loop["best_epoch"], "best_val_acc": loop["best_acc"], "epochs_run": loop["epoch"],
            "stopped_early": loop["stopped_early"], "train_seconds": sum(r["seconds"] for r in loop["history"]),
            "images_per_s": last.get("images_per_s"), "history": loop["history"]}
