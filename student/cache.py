"""Teacher targets computed once per training example and kept compactly on disk.

Why: the ensemble teacher is the generalist plus every active specialist plus a per-example KL
combination. Running it for every batch of every epoch would multiply the student's training time
by the ensemble's size; running it once over the training split and looking the targets up by
example index makes a distillation epoch cost about what a hard-label epoch costs.

What is stored (``<dir>/``): for each training example the ``top_k`` largest teacher
log-probabilities (``log-probs.npy``, float16 [N, k]) with their class ids (``indices.npy``, int32
[N, k]), the probability mass of all other classes (``residual.npy``, float32 [N]) and how many
classes that tail effectively spreads over (``tail-classes.npy``, float32 [N]: the exponential of the
normalised tail's entropy, between 1 and K - k); ``cache.json`` (written last, so its presence means
the cache is complete) holds the key and what it describes. Expanding a row spreads the residual mass
evenly over the classes outside the top k: exact for the classes that matter, and the tail keeps its
total mass (so the KL term still pushes the student's tail down as a whole) without storing K numbers
per example. With ``top_k >= K`` nothing is lost but float16 rounding.

The temperature: the soft term reads ``softmax(log q / T)``, and raising an even split to ``1 / T``
gives the tail far more mass than the teacher's real tail would get (an even split maximises
``sum q_i^(1/T)``): with 3755 classes, top 32 and T = 2, 55-61% of the tempered targets sat in the
tail and the students fine-tuned from the generalist lost 14.6 held-out points in their first epoch.
``lookup`` therefore takes the loss's temperature and sets the tail so that its *tempered* mass is
what a tail of that mass spread over its effective number of classes would have, ``n (r / n)^(1/T)``
(exact for a tail that is even over n classes; at T = 1 it is the plain even split).

What the cache assumes about augmentation: the targets are computed on the *un-augmented* training
images and reused for every augmented view the student sees. For label-preserving augmentation
(small affine changes, contrast, noise) the teacher's distribution on a view is close to the one on
the clean image, so this is the usual fixed-target distillation; it is not the "consistent"
teaching of Beyer et al. 2022, where teacher and student see the same view, which can be somewhat
more accurate but needs the teacher in every step. With ``data.augment: false`` the cached targets
are exactly what a live teacher would give (up to the top-k tail).

The key is a hash of everything the targets depend on (teacher kind, the upstream stages' config
hashes, seeds, top_k, and a fingerprint of the training images and labels). A cache whose key
differs is never used silently: :func:`load_cache` refuses it with one line, and
:func:`load_or_build` (what the student stage calls) rebuilds it and says so.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from specdistill.artifacts import read_json, read_npy, write_json, write_npy
from specdistill.errors import SpecdistillError
from specdistill.hashing import digest_arrays, digest_json

CACHE_FORMAT = 2   # 2: tail-classes.npy
_FLOOR = -1e4           # log-probs below this are 0 in float32 anyway; float16 reaches -65504
_TINY = 1e-30           # residual mass floor, so an empty tail stays finite in log space

TeacherFn = Callable[[np.ndarray], torch.Tensor]   # uint8 images [b, ...] -> log-probs [b, K]


def cache_key(description: dict[str, Any]) -> str:
    """A short hash of a JSON-able description of the teacher targets."""
    return digest_json({"format": CACHE_FORMAT, **description})


def data_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """A hash of the training examples themselves, so a re-rendered or re-split data set (same
    config, different files) never reuses targets that belong to other images. A streamed image
    folder is named by its files and how they are read (hashing its pixels would decode it whole)."""
    if hasattr(images, "fingerprint"):
        return digest_json([images.fingerprint(), digest_arrays(np.asarray(labels, dtype=np.int64))])
    return digest_arrays(images, np.asarray(labels, dtype=np.int64))


class TeacherCache:
    """Compact teacher log-probs for every training example; ``lookup`` gives dense [B, K] rows."""

    def __init__(self, log_probs: np.ndarray, indices: np.ndarray, residual: np.ndarray, tail_classes: np.ndarray,
                 num_classes: int, key: str, description: dict[str, Any] | None = None) -> None:
        n, k = log_probs.shape
        if indices.shape != (n, k) or residual.shape != (n,) or tail_classes.shape != (n,):
            raise SpecdistillError(f"teacher cache arrays disagree: log-probs {log_probs.shape}, indices "
                                   f"{indices.shape}, residual {residual.shape}, tail classes {tail_classes.shape}; "
                                   "delete the cache to rebuild it")
        if k > num_classes or (n and (indices.min() < 0 or indices.max() >= num_classes)):
            raise SpecdistillError(f"teacher cache holds class ids outside [0, {num_classes}); "
                                   "delete the cache to rebuild it")
        self.log_probs = torch.from_numpy(np.ascontiguousarray(log_probs, dtype=np.float16))
        self.indices = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int32))
        self.residual = torch.from_numpy(np.ascontiguousarray(residual, dtype=np.float32))
        self.tail_classes = torch.from_numpy(np.ascontiguousarray(tail_classes, dtype=np.float32))
        self.num_classes = int(num_classes)
        self.key = key
        self.description = description or {}

    def __len__(self) -> int:
        return self.log_probs.shape[0]

    @property
    def top_k(self) -> int:
        return self.log_probs.shape[1]

    def lookup(self, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Dense teacher log-probs [B, K] (float32) for the training examples ``index``.

        ``temperature``: the T the caller will divide these by. Each tail class gets
        ``log(r / n) + T log(n / (K - k))`` (r the tail's mass, n its effective class count), so that
        ``softmax(log q / T)`` gives the tail the tempered mass ``n (r / n)^(1/T)`` (module docstring);
        at T = 1 this is the even split ``log(r / (K - k))``.
        """
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise SpecdistillError(f"teacher cache has {len(self)} examples but index {int(index.max())} "
                                   "was asked for; the cache belongs to another training split")
        top = self.log_probs[index].float()
        rest = self.num_classes - self.top_k
        if rest > 0:
            classes = self.tail_classes[index].clamp(1.0, float(rest))
            fill = (torch.log(self.residual[index].clamp_min(_TINY) / classes)
                    + float(temperature) * torch.log(classes / rest))
        else:
            fill = torch.full((len(index),), _FLOOR)
        dense = fill.unsqueeze(1).expand(len(index), self.num_classes).clone()
        dense.scatter_(1, self.indices[index].long(), top)
        return torch.log_softmax(dense, dim=1)   # renormalise away float16 rounding

    def save(self, directory: str | os.PathLike) -> None:
        out = Path(directory)
        (out / "cache.json").unlink(missing_ok=True)   # an interrupted rewrite must not look complete
        write_npy(out / "log-probs.npy", self.log_probs.numpy())
        write_npy(out / "indices.npy", self.indices.numpy())
        write_npy(out / "residual.npy", self.residual.numpy())
        write_npy(out / "tail-classes.npy", self.tail_classes.numpy())
        write_json(out / "cache.json", {
            "format": CACHE_FORMAT, "key": self.key, "num_classes": self.num_classes,
            "num_examples": len(self), "top_k": self.top_k, "description": self.description,
            "assumes": "targets computed on un-augmented training images, reused for augmented views",
        })


def compress(log_probs: torch.Tensor, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-k log-probs (float16), their class ids (int32), the remaining mass (float32) and the
    effective number of classes it spreads over (float32: exp of the normalised tail's entropy)."""
    log_probs = torch.as_tensor(log_probs, dtype=torch.float32)
    k = min(top_k, log_probs.shape[1])
    top, idx = log_probs.topk(k, dim=1)
    masked = log_probs.scatter(1, idx, float("-inf"))
    if k < log_probs.shape[1]:
        # the tail's mass from its own logsumexp: 1 - sum(top) would cancel to 0 when the top k hold
        # nearly everything
        log_residual = torch.logsumexp(masked, dim=1, keepdim=True)
        log_tail = masked - log_residual   # the tail alone, renormalised (0 * -inf terms are nan: dropped)
        entropy = -(log_tail.exp() * log_tail).nan_to_num(0.0).sum(1)
        residual, classes = log_residual.squeeze(1).exp(), entropy.exp().clamp(1.0, log_probs.shape[1] - k)
    else:
        residual, classes = torch.zeros(len(top)), torch.ones(len(top))
    return (top.clamp_min(_FLOOR).to(torch.float16).numpy(), idx.to(torch.int32).numpy(),
            torch.nan_to_num(residual, nan=0.0).numpy().astype(np.float32), classes.numpy().astype(np.float32))


def tempered_tail_share(cache: TeacherCache, temperature: float, sample: int = 2048) -> float:
    """Mean share of the tempered targets ``softmax(log p / T)`` on the classes outside the top k.

    The cache keeps that tail as an even split over its effective number of classes, tempered as
    :meth:`TeacherCache.lookup` describes; a teacher whose tail is broad still puts much of its
    tempered mass there at a high T (before the effective count was kept, an even split over every
    tail class: on hanzi-1k at T = 4, 81%). Reported per cache, so a temperature can be chosen knowing it.
    """
    if len(cache) == 0 or cache.top_k >= cache.num_classes:
        return 0.0
    index = torch.linspace(0, len(cache) - 1, min(sample, len(cache))).long()
    soft = torch.softmax(cache.lookup(index, temperature) / temperature, dim=1)
    top = soft.gather(1, cache.indices[index].long()).sum(1)
    return float(1.0 - top.mean())


def build_cache(teacher: TeacherFn, images: np.ndarray, top_k: int, key: str,
                description: dict[str, Any] | None = None, batch_size: int = 512,
                progress: bool = True, desc: str = "teacher cache") -> TeacherCache:
    """Run ``teacher`` once over ``images`` in batches, keeping only the compact targets."""
    if top_k < 1:
        raise SpecdistillError(f"student.cache_top_k={top_k} must be >= 1")
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    num_classes = None
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False,
                      total=math.ceil(len(images) / batch_size)):
        log_probs = teacher(images[start:start + batch_size])
        if not torch.isfinite(log_probs).any(dim=1).all():
            raise SpecdistillError(f"{desc}: the teacher gave a row with no finite log-probability near "
                                   f"example {start}; check the teacher's weights")
        if num_classes is None:
            num_classes = log_probs.shape[1]
        elif log_probs.shape[1] != num_classes:
            raise SpecdistillError(f"{desc}: the teacher changed its class count from {num_classes} to "
                                   f"{log_probs.shape[1]} between batches")
        parts.append(compress(log_probs, top_k))
    if num_classes is None:
        raise SpecdistillError(f"{desc}: no training images to compute teacher targets for")
    top, idx, residual, tail_classes = (np.concatenate(p) for p in zip(*parts))
    return TeacherCache(top, idx, residual, tail_classes, num_classes, key, description)


def load_cache(directory: str | os.PathLike, key: str) -> TeacherCache:
    """The cache in ``directory``; one clear error if it is missing or built for another config."""
    directory = Path(directory)
    if not (directory / "cache.json").exists():
        raise SpecdistillError(f"no complete teacher cache in {directory}; run the student stage to build it")
    info = read_json(directory / "cache.json")
    if info.get("format") != CACHE_FORMAT or info.get("key") != key:
        raise SpecdistillError(
            f"teacher cache {directory} was built for another teacher config (key {info.get('key')}, "
            f"expected {key}; it describes {json.dumps(info.get('description', {}), sort_keys=True)}); "
            "delete it, or let the student stage rebuild it"
        )
    return TeacherCache(read_npy(directory / "log-probs.npy"), read_npy(directory / "indices.npy"),
                        read_npy(directory / "residual.npy"), read_npy(directory / "tail-classes.npy"),
                        int(info["num_classes"]), key,
                        info.get("description"))


def load_or_build(directory: str | os.PathLike, description: dict[str, Any], teacher: Callable[[], TeacherFn],
                  images: np.ndarray, top_k: int, batch_size: int = 512, progress: bool = True,
                  desc: str = "teacher cache") -> TeacherCache:
    """Reuse the cache when its key matches ``description``; otherwise build (or rebuild) it.

    ``teacher`` is a factory so an up-to-date cache never loads the teacher's weights at all.
    """
    directory = Path(directory)
    description = {**description, "top_k": top_k}
    key = cache_key(description)
    if (directory / "cache.json").exists():
        old = read_json(directory / "cache.json")
        if old.get("key") == key and old.get("format") == CACHE_FORMAT:
            cache = load_cache(directory, key)
            if len(cache) == len(images):
                return cache
        tqdm.write(f"{desc}: {directory} was built for another teacher config; rebuilding it")
    cache = build_cache(teacher(), images, top_k, key, description, batch_size, progress, desc)
    cache.save(directory)
    return cache
