"""The ensemble as one object: the generalist, the specialists and how they are combined.

:class:`Ensemble` loads everything the combination needs from a run directory (the generalist, each
specialist with its group and dustbin correction, the held-out calibration when asked for) and
gives log-probabilities for a batch of images. It is the one forward pass of the generalist +
specialists: the combine stage evaluates it, the student stage distils it. A specialist runs only on
the rows where it is active (the only rows the combiner reads), so the cost grows with how often
a specialist speaks, not with how many there are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from combine.activation import active_specialists
from combine.calibration import Calibration, apply_temperature
from combine.gating import Gate
from combine.kl import kl_combine
from combine.stacked import StackedSpecialists, stackable
from specdistill.config import CombineConfig
from specdistill.data import take
from specdistill.data.loading import to_float
from specdistill.engine import predict_logits
from specdistill.errors import SpecdistillError
from specdistill.models import load_classifier
from specdistill.records import Clusters, SpecialistInfo
from specdistill.rundir import RunDir
from specialists.dustbin import specialist_log_probs  # the one place the dustbin correction is applied
from specialists.store import load_specialists


class Ensemble:
    """Generalist + specialists; ``groups[m]`` holds specialist m's class ids in its output order."""

    def __init__(self, generalist: nn.Module, num_classes: int, specialists: Sequence[nn.Module],
                 infos: Sequence[SpecialistInfo], device: torch.device | str = "cpu", batch_size: int = 512,
                 calibration: Calibration | None = None, stack: bool = True) -> None:
        self.device = torch.device(device)
        self.generalist = generalist.to(self.device).eval()
        self.num_classes = num_classes
        self.specialists = [s.to(self.device).eval() for s in specialists]
        self.infos = list(infos)
        self.groups = [torch.as_tensor(i.classes, dtype=torch.int64) for i in self.infos]
        self.batch_size = batch_size
        self.calibration = calibration or Calibration.identity(len(self.specialists))
        self.num_core: list[int] | None = None   # per group, its k-means members (listed first); None: all
        self.gate = Gate.open(len(self.specialists))   # which specialists speak where (combine.gating)
        # small specialists of one architecture run as one batched network (combine.stacked), built on
        # first use: the combine stage runs each specialist once over a whole split and never needs it
        self.stack = stack
        self._stacked: StackedSpecialists | None = None
        self._stackable: bool | None = None

    def read_choices(self, run: RunDir, rule: CombineConfig) -> None:
        """Set :attr:`calibration` and :attr:`gate` from the records the combine stage wrote for ``rule``
        (``combine/calibration.json``, ``combine/gating.json``), each checked against the specialist count."""
        if rule.calibrate or rule.calibrate_ensemble:
            self.calibration = Calibration.read(run.calibration, len(self))
        if rule.gate != "none" or rule.weighting != "equal":
            self.gate = Gate.read(run.gating, len(self))

    @classmethod
    def load(cls, run: RunDir, device: torch.device | str = "cpu", batch_size: int = 512) -> Ensemble:
        """The finished generalist and specialists of ``run``, checked against each other; the caller
        sets :attr:`calibration` and :attr:`gate` (each record checks its own specialist count)."""
        generalist, meta = load_classifier(run.generalist_weights, device)
        num_classes = int(meta["num_classes"])
        loaded = load_specialists(run, device, num_classes)
        models, infos = [model for model, _ in loaded], [info for _, info in loaded]
        num_core = None
        if run.clusters.exists():   # each specialist speaks for the group it was trained on
            clusters = {g.id: g for g in Clusters.read(run.clusters, num_classes).groups}
            for info in infos:
                if info.id not in clusters or clusters[info.id].classes != info.classes:
                    raise SpecdistillError(
                        f"{run.specialist_info(info.id)} names other classes than group {info.id} of "
                        f"{run.clusters}; run the same command again (specdistill run CONFIG): a specialist "
                        "that does not match its group is trained again")
            num_core = [clusters[i.id].num_core if clusters[i.id].num_core is not None else len(i.classes)
                        for i in infos]
        ensemble = cls(generalist, num_classes, models, infos, device, batch_size)
        ensemble.num_core = num_core
        return ensemble

    @property
    def ids(self) -> list[int]:
        return [i.id for i in self.infos]

    def __len__(self) -> int:
        return len(self.specialists)

    # ---- the models, one at a time
    @torch.no_grad()
    def generalist_log_probs(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[B, K] calibrated log-probabilities of the generalist, on the CPU."""
        logits = predict_logits(self.generalist, images, self.batch_size, self.device)
        return apply_temperature(torch.log_softmax(logits, dim=1), self.calibration.generalist)

    def specialist_log_probs(self, m: int, images: np.ndarray | torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """[B, |S_m| + 1] dustbin-corrected log-probabilities of specialist m, on the CPU; calibrated unless
        ``calibrated=False`` (the combine stage fits the calibration on those)."""
        tau = self.calibration.specialists[m] if calibrated else 1.0
        return specialist_log_probs(self.specialists[m], images, self.infos[m].dustbin_correction,
                                    self.batch_size, self.device, tau).cpu()

    def specialist_outputs(self, images: np.ndarray | torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        """Each specialist's [B, |S_m| + 1] rows where ``active[:, m]``; rows it skips are zeros, never read."""
        stacked = self.stacked_specialists()
        if stacked is not None:
            return self._stacked_outputs(stacked, images, active)
        outputs = []
        for m, group in enumerate(self.groups):
            out = torch.zeros(len(images), len(group) + 1)
            rows = active[:, m].cpu().numpy()
            if rows.any():
                out[torch.as_tensor(rows)] = self.specialist_log_probs(m, take(images, rows))
            outputs.append(out)
        return outputs

    def stacked_specialists(self) -> StackedSpecialists | None:
        """The specialists as one batched network, built once; None when :attr:`stack` is off or they
        cannot be stacked (``combine.stacked.stackable``: different architectures, or large ones)."""
        if self.stack and self._stackable is None:   # decided once, not per batch
            self._stackable = stackable(self.specialists)
            if self._stackable:
                self._stacked = StackedSpecialists(self.specialists, [i.dustbin_correction for i in self.infos],
                                                   self.device)
        return self._stacked if self.stack else None

    def _stacked_outputs(self, stacked: StackedSpecialists, images: np.ndarray | torch.Tensor,
                         active: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`specialist_outputs` with every active (row, specialist) pair in one batched call."""
        active = active.cpu()
        used = active.any(1)
        if not used.any():
            return [torch.zeros(len(images), len(group) + 1) for group in self.groups]
        if isinstance(images, torch.Tensor) and images.is_floating_point():   # an already normalised batch
            x, rows_of = images.to(self.device), torch.arange(len(images))
        else:   # uint8 images: only the rows some specialist reads
            picked = used.nonzero().squeeze(1)
            x = to_float(torch.as_tensor(np.asarray(take(images, picked.numpy()))).to(self.device))
            rows_of = torch.full((len(images),), -1, dtype=torch.int64)
            rows_of[picked] = torch.arange(len(picked))
        models, rows = active.t().nonzero(as_tuple=True)    # pairs sorted by specialist
        temperatures = torch.as_tensor(self.calibration.specialists, dtype=torch.float32, device=self.device)
        values = stacked.log_probs(x, rows_of[rows].to(self.device), models.to(self.device), temperatures,
                                   4 * self.batch_size).cpu()
        counts = torch.bincount(models, minlength=len(self)).tolist()
        outputs = []
        for group, pair_rows, pair_values in zip(self.groups, rows.split(counts), values.split(counts)):
            out = torch.zeros(len(images), len(group) + 1)
            out[pair_rows] = pair_values[:, :len(group) + 1]
            outputs.append(out)
        return outputs

    def active(self, gen_log_probs: torch.Tensor, top_n: int) -> torch.Tensor:
        """[B, M] bool: the paper's rule (specialist m speaks when its group meets the generalist's
        top-n), narrowed by the held-out gate."""
        return self.gate.apply(active_specialists(gen_log_probs, self.groups, top_n), gen_log_probs)

    # ---- the combination
    def combine(self, gen_log_probs: torch.Tensor, outputs: Sequence[torch.Tensor], rule: CombineConfig,
                active: torch.Tensor | None = None) -> torch.Tensor:
        """The KL combiner over given model outputs (on the ensemble's device), log q as float on the CPU,
        at the held-out temperature of the combination; ``active`` defaults to :meth:`active` (the top-n
        rule and the gate)."""
        active = self.active(gen_log_probs, rule.top_n) if active is None else active
        log_q = kl_combine(gen_log_probs.to(self.device), [g.to(self.device) for g in self.groups],
                           [o.to(self.device) for o in outputs], solver=rule.solver, max_iter=rule.max_iter,
                           tol=rule.tol, active=active.to(self.device), weights=self.gate.weights).float().cpu()
        return apply_temperature(log_q, self.calibration.ensemble)

    def log_probs(self, images: np.ndarray | torch.Tensor, rule: CombineConfig) -> torch.Tensor:
        """[B, K] log q of the ensemble (on the CPU) for uint8 images or a normalised float batch (the
        student's augmented view): generalist, active specialists, KL combiner."""
        return self.log_probs_and_active(images, rule)[0]

    def log_probs_and_active(self, images: np.ndarray | torch.Tensor,
                             rule: CombineConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`log_probs` and the [B, M] bool mask of the specialists that spoke for each image."""
        gen = self.generalist_log_probs(images)
        active = self.active(gen, rule.top_n)
        return self.combine(gen, self.specialist_outputs(images, active), rule, active=active), active
