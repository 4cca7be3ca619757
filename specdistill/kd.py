"""Distillation losses behind one registry, and the mdistiller-style :class:`Distiller`.

Every loss is a small module ``loss(student_logits, teacher, labels) -> {name: term}``: the terms
are already weighted, so the objective is their sum and the training log shows each one. The
teacher is given as log-probabilities (what the combiner and the teacher cache produce) or as raw
logits: both work, because a softmax is blind to a constant added to every logit of an example and
log q = z - logsumexp(z) differs from the logits z only by such a constant.

The losses (the config's ``student.loss.name``):

* ``hinton`` - Hinton, Vinyals & Dean 2015: ``alpha * T^2 * KL(q_T || p_T) + (1 - alpha) * CE``,
  where ``q_T = softmax(log q / T)`` (q^(1/T) renormalised) and ``p_T`` the student's softmax at T.
  The T^2 keeps the soft term's gradient roughly the same size at every T (its gradient w.r.t. the
  student logits is ``T * (p_T - q_T)`` which tends to ``(z - v) / K`` as T grows), so changing T
  does not silently change the balance with the hard term.
* ``logit_matching`` - Ba & Caruana 2014: squared error between student and teacher logits. The
  paper shows this is the high-temperature limit of the soft term *when the logits of each example
  have zero mean*; a log-probability teacher has no preferred offset, so both sides are centred
  per example and the squared error is scaled by ``1 / (2K)``, which makes it equal to that limit.
  Caveat: a log-probability is unbounded below, so classes the teacher all but rules out would
  dominate a squared error; the teacher cache flattens every class outside its top k to the log of
  an even share of the residual mass, which acts as a floor on those "logits".
* ``noisy_teacher`` - Sau & Balasubramanian 2016: the teacher's (centred) logits are perturbed as in
  their paper, ``v' = v * (1 + xi)`` with ``xi ~ N(0, noise_std^2)`` per logit, on each example of a
  training batch with probability ``noise_fraction`` (their alpha), then the ``hinton`` loss; no
  noise in eval mode. The noise acts like several teachers and as a regulariser. Centring first
  keeps the perturbation independent of the arbitrary offset of log-probability teachers.
* ``hard`` - cross-entropy on the labels alone (the baseline a distilled student must beat).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from specdistill.config import StudentLossConfig
from specdistill.errors import SpecdistillError
from specdistill.registry import Registry

LossTerms = dict[str, torch.Tensor]
LOSSES: Registry[Callable[..., nn.Module]] = Registry("distillation loss")


# ----------------------------------------------------------------------------------------------
# Checks shared by every loss: constructor arguments and the shapes seen at the first batch.


def check_temperature(temperature: float) -> float:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise SpecdistillError(
            f"distillation temperature T={temperature!r} must be a finite number > 0; "
            "set student.loss.temperature to e.g. 4"
        )
    return float(temperature)


def check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise SpecdistillError(
            f"distillation weight alpha={alpha!r} must lie in [0, 1] (the share of the soft term); "
            "set student.loss.alpha to e.g. 0.9"
        )
    return float(alpha)


def check_teacher(student_logits: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
    """The teacher must score the same classes as the student, one row per example."""
    if teacher is None:
        raise SpecdistillError("this distillation loss needs teacher targets but got none; "
                               "use student.loss.name=hard to train on labels alone")
    if teacher.ndim != 2 or student_logits.ndim != 2:
        raise SpecdistillError(f"teacher targets must be [batch, classes] like the student's logits, got "
                               f"teacher {tuple(teacher.shape)} and student {tuple(student_logits.shape)}")
    if teacher.shape[1] != student_logits.shape[1]:
        raise SpecdistillError(
            f"the teacher scores {teacher.shape[1]} classes but the student {student_logits.shape[1]}; "
            "build the student for the teacher's classes (same data config as the run that trained it)"
        )
    if teacher.shape[0] != student_logits.shape[0]:
        raise SpecdistillError(f"teacher targets for {teacher.shape[0]} examples but the student saw "
                               f"{student_logits.shape[0]}; the batch index and the targets disagree")
    return teacher.to(device=student_logits.device, dtype=_wide(student_logits).dtype)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (AMP hands over half-precision logits); float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def centred(logits: torch.Tensor) -> torch.Tensor:
    """Per-example zero-mean logits: the representative of a softmax's logits that Hinton's
    high-temperature argument (and logit matching) assumes."""
    return logits - logits.mean(dim=1, keepdim=True)


def soft_kl(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(q_T || p_T) averaged over the batch, with q_T = softmax(teacher / T)."""
    log_q = F.log_softmax(teacher / temperature, dim=1)
    log_p = F.log_softmax(_wide(student_logits) / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


# ----------------------------------------------------------------------------------------------
# The losses


@LOSSES.register("hard")
class HardLabelLoss(nn.Module):
    """Cross-entropy on the labels alone; ignores any teacher."""

    needs_teacher = False

    def __init__(self, **_: object) -> None:
        super().__init__()

    def forward(self, student_logits: torch.Tensor, teacher: torch.Tensor | None,
                labels: torch.Tensor) -> LossTerms:
        return {"ce": F.cross_entropy(_wide(student_logits), labels)}


@LOSSES.register("hinton")
class HintonLoss(nn.Module):
    """``alpha * T^2 * KL(q_T || p_T) + (1 - alpha) * CE(labels)``; terms ``kd`` and ``ce``."""

    needs_teacher = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, **_: object) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)

    def teacher_logits(self, teacher: torch.Tensor) -> torch.Tensor:
        return teacher

    def forward(self, student_logits: torch.Tensor, teacher: torch.Tensor | None,
                labels: torch.Tensor) -> LossTerms:
        teacher = self.teacher_logits(check_teacher(student_logits, teacher))
        terms: LossTerms = {}
        if self.alpha > 0:
            t = self.temperature
            terms["kd"] = self.alpha * t * t * soft_kl(student_logits, teacher, t)
        if self.alpha < 1:
            terms["ce"] = (1 - self.alpha) * F.cross_entropy(_wide(student_logits), labels)
        return terms


@LOSSES.register("logit_matching")
class LogitMatchingLoss(nn.Module):
    """``alpha * ||c(z) - c(v)||^2 / (2K) + (1 - alpha) * CE`` with c() the per-example centring.

    Centring makes log-probability teachers usable (they equal logits up to a per-example
    constant) and gives exactly the limit of ``T^2 * KL`` as T -> infinity, so ``hinton`` at a very
    high temperature and this loss agree; terms ``mse`` and ``ce``.
    """

    needs_teacher = True

    def __init__(self, alpha: float = 1.0, **_: object) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)

    def forward(self, student_logits: torch.Tensor, teacher: torch.Tensor | None,
                labels: torch.Tensor) -> LossTerms:
        teacher = check_teacher(student_logits, teacher)
        terms: LossTerms = {}
        if self.alpha > 0:
            diff = centred(_wide(student_logits)) - centred(teacher)
            terms["mse"] = self.alpha * 0.5 * diff.pow(2).mean(dim=1).mean()
        if self.alpha < 1:
            terms["ce"] = (1 - self.alpha) * F.cross_entropy(_wide(student_logits), labels)
        return terms


@LOSSES.register("noisy_teacher")
class NoisyTeacherLoss(HintonLoss):
    """Hinton's loss on a teacher whose centred logits get ``v * (1 + xi)``, xi ~ N(0, noise_std^2),
    on a ``noise_fraction`` of the examples of each training batch (Sau & Balasubramanian 2016)."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, noise_std: float = 0.1,
                 noise_fraction: float = 1.0, **_: object) -> None:
        super().__init__(temperature=temperature, alpha=alpha)
        if not isinstance(noise_std, (int, float)) or not math.isfinite(noise_std) or noise_std < 0:
            raise SpecdistillError(f"noise_std={noise_std!r} must be >= 0; set student.loss.noise_std "
                                   "to e.g. 0.1")
        if not isinstance(noise_fraction, (int, float)) or not 0.0 <= noise_fraction <= 1.0:
            raise SpecdistillError(f"noise_fraction={noise_fraction!r} must lie in [0, 1]; set "
                                   "student.loss.noise_fraction to e.g. 0.5")
        self.noise_std = float(noise_std)
        self.noise_fraction = float(noise_fraction)

    def teacher_logits(self, teacher: torch.Tensor) -> torch.Tensor:
        if not self.training or self.noise_std == 0 or self.noise_fraction == 0:
            return teacher
        logits = centred(teacher)
        xi = torch.randn_like(logits) * self.noise_std
        hit = torch.rand(logits.shape[0], 1, device=logits.device) < self.noise_fraction
        return torch.where(hit, logits * (1 + xi), logits)


def build_loss(name: str, **options: object) -> nn.Module:
    """The registered loss ``name``, constructed (and checked) with the options it understands."""
    return LOSSES.get(name)(**options)


def loss_from_config(cfg: StudentLossConfig) -> nn.Module:
    """The loss a ``student.loss`` config section names, with its temperature, alpha and noise."""
    return build_loss(cfg.name, **cfg.model_dump(exclude={"name"}))


# ----------------------------------------------------------------------------------------------
# The distiller: student + loss + a teacher pinned in eval mode


@runtime_checkable
class TeacherTargets(Protocol):
    """Precomputed teacher targets: ``lookup(index, temperature)`` gives [B, K] log-probs for training
    examples, made for a loss that divides them by ``temperature`` (a compact cache sets its tail so)."""

    def lookup(self, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor: ...


@dataclass(frozen=True)
class Mix:
    """One mixup draw for a batch: example i becomes ``lam_i * x_i + (1 - lam_i) * x_partner[i]``."""

    lam: torch.Tensor        # [B], in [0.5, 1]
    partner: torch.Tensor    # [B], a permutation of the batch

    @staticmethod
    def draw(batch: int, concentration: float, device: torch.device | str) -> Mix:
        """``lam ~ Beta(c, c)`` per example, folded onto [0.5, 1]; a random partner per example. Drawn from
        the global CPU generator, which the training checkpoint saves, so a resumed run mixes alike."""
        c = torch.tensor(float(concentration))
        lam = torch.distributions.Beta(c, c).sample((batch,))
        lam = torch.maximum(lam, 1 - lam)
        return Mix(lam.to(device), torch.randperm(batch).to(device))

    def images(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.lam.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return lam * x + (1 - lam) * x[self.partner]

    def probs(self, p: torch.Tensor) -> torch.Tensor:
        """The same mix of per-example distributions [B, K] (e.g. one-hot labels)."""
        lam = self.lam.unsqueeze(1).to(p.dtype)
        return lam * p + (1 - lam) * p[self.partner]

    def log_probs(self, log_p: torch.Tensor) -> torch.Tensor:
        """:meth:`probs` in log space: log(lam p_i + (1 - lam) p_j), no underflow for tiny probabilities."""
        lam = self.lam.unsqueeze(1).to(log_p.dtype)
        return torch.logaddexp(lam.log() + log_p, torch.log1p(-lam).clamp_min(-1e4) + log_p[self.partner])


class Distiller(nn.Module):
    """A student trained from a teacher (mdistiller's shape).

    ``teacher`` is a model run live on the same (augmented) batch, or :class:`TeacherTargets`
    looked up by the examples' indices in the training split (the cache), or ``None`` for the
    hard-label loss. A live teacher is frozen and stays in eval mode whatever ``train()`` says, so
    its batch-norm statistics and dropout never drift while the student trains.

    ``mixup`` > 0 trains on mixed pairs of the batch (Zhang et al. 2018): each example becomes
    ``lam x_i + (1 - lam) x_j`` with ``lam ~ Beta(mixup, mixup)`` drawn per example (the larger weight
    on ``x_i``, so the training accuracy reads the main image's label) and a random partner ``j``, its
    label the same mix of the two one-hot labels. A live teacher scores the mixed image itself (Beyer
    et al. 2022, "function matching": on mixed images a sure teacher becomes unsure, and there the
    ensemble's specialists speak); cached targets can only be mixed like the labels, ``lam q_i + (1 -
    lam) q_j``. Training steps only; evaluation sees the images as they are.
    """

    def __init__(self, student: nn.Module, loss: nn.Module,
                 teacher: nn.Module | TeacherTargets | None = None, mixup: float = 0.0) -> None:
        super().__init__()
        if getattr(loss, "needs_teacher", True) and teacher is None:
            raise SpecdistillError("the distillation loss needs a teacher but none was given; "
                                   "use student.loss.name=hard to train on labels alone")
        if not isinstance(mixup, (int, float)) or not math.isfinite(mixup) or mixup < 0:
            raise SpecdistillError(f"mixup={mixup!r} must be a finite number >= 0 (0 = off); set student.mixup "
                                   "to e.g. 1.0")
        self.student = student
        self.loss = loss
        self.teacher = teacher
        self.mixup = float(mixup)
        if isinstance(teacher, nn.Module):
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor, index: torch.Tensor | None,
                        mix: Mix | None = None) -> torch.Tensor | None:
        """The teacher's log-probs for the batch ``images`` (already mixed by ``mix``, if given)."""
        if self.teacher is None or not getattr(self.loss, "needs_teacher", True):
            return None
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval()
            return self.teacher(images).float()
        if index is None:
            raise SpecdistillError("cached teacher targets need the examples' indices; "
                                   "the training loop must pass `index`")
        temperature = getattr(self.loss, "temperature", 1.0)   # the T the loss divides the targets by
        targets = self.teacher.lookup(index.cpu(), temperature).to(images.device)
        return targets if mix is None else mix.log_probs(targets)

    def compute(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                index: torch.Tensor | None) -> tuple[torch.Tensor, LossTerms]:
        mix = Mix.draw(len(images), self.mixup, images.device) if self.mixup > 0 and student.training else None
        if mix is not None:
            images = mix.images(images)
        logits = student(images)
        if mix is not None:
            labels = mix.probs(F.one_hot(labels, logits.shape[1]).float())
        return logits, self.loss(logits, self.teacher_targets(images, index, mix), labels)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor,
                      index: torch.Tensor | None = None) -> tuple[torch.Tensor, LossTerms]:
        return self.compute(self.student, images, labels, index)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def objective(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  index: torch.Tensor | None = None) -> tuple[torch.Tensor, LossTerms]:
        """``engine.fit(objective=...)`` form: the engine passes the student it is training."""
        self.loss.train(model.training)
        return self.compute(model, images, labels, index)
