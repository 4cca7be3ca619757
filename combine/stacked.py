"""Many small specialists run as one batched network (``torch.func.stack_module_state`` + ``vmap``).

On a batch, each specialist speaks only for the few rows its group meets the generalist's top-n: on
the capacity-bound hanzi config (61 specialists, batch 256) about 9 rows each. Run one at a time,
a small specialist's forward pass costs its per-call overhead, not its arithmetic: 59 calls took
about 150 ms of a live ensemble teacher's 200 ms per batch on a 2-core CPU. Here the specialists'
weights are stacked once and every active (row, specialist) pair goes through one vectorised call:
the rows of each specialist are cut into slots of ``cap`` rows (zero-padded), each slot runs under
its own specialist's weights (``vmap`` turns the convolutions into grouped ones), and the heads,
padded to the largest group, are one batched matrix product.

Only for specialists that share an architecture up to the head's width (the pipeline trains every
specialist from the same config) and are small: the slots gather a copy of their specialist's
weights, so large specialists, which are compute-bound anyway, keep the one-at-a-time loop
(:func:`stackable`). The batched call runs in float32 on every device (no autocast).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from specdistill.models import Classifier

# at most this many parameters per specialist: above it a forward pass is compute-bound and the
# per-slot weight copies would cost memory for nothing
MAX_PARAMETERS = 1_000_000
_GATHER_FLOATS = 1 << 24   # at most this many weights gathered for one batched call (64 MB of float32)


def stackable(specialists: Sequence[nn.Module]) -> bool:
    """Whether ``specialists`` can run as one batched network: at least two small
    :class:`~specdistill.models.Classifier` models whose backbones have the same parameter and buffer
    shapes, one input normalisation and linear heads on features of one width."""
    if len(specialists) < 2 or not all(isinstance(s, Classifier) for s in specialists):
        return False
    first = specialists[0]
    if sum(p.numel() for p in first.parameters()) > MAX_PARAMETERS:
        return False

    def shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(t.shape)) for name, t in (*model.backbone.named_parameters(),
                                                        *model.backbone.named_buffers())]

    def normalisation(model: Classifier) -> tuple:
        return tuple(None if t is None else t.flatten().tolist() for t in (model.input_scale, model.input_shift))

    reference = (shapes(first), first.num_features, normalisation(first), type(first.backbone))
    return all((shapes(s), s.num_features, normalisation(s), type(s.backbone)) == reference for s in specialists)


class StackedSpecialists:
    """``len(specialists)`` classifiers as one batched network; :meth:`log_probs` gives each active
    (row, specialist) pair its dustbin-corrected, tempered log-probabilities, as the one-at-a-time
    ``specialists.dustbin.specialist_log_probs`` would."""

    def __init__(self, specialists: Sequence[Classifier], corrections: Sequence[float],
                 device: torch.device) -> None:
        self.device = device
        self.widths = [s.num_classes for s in specialists]     # |S_m| + 1, the dustbin last
        self.first = specialists[0]
        backbones = [s.backbone.to(device).eval() for s in specialists]
        self.params, self.buffers = stack_module_state(backbones)
        self.params = {k: v.detach() for k, v in self.params.items()}
        self.floats_per_model = sum(v[0].numel() for v in (*self.params.values(), *self.buffers.values())) \
            + max(self.widths) * (specialists[0].num_features + 1)
        self.base = copy.deepcopy(backbones[0]).to("meta")
        widest = max(self.widths)
        features = specialists[0].num_features
        # heads padded to the widest group: padded columns get -inf, so a softmax gives them nothing
        self.weight = torch.zeros(len(specialists), widest, features, device=device)
        self.bias = torch.full((len(specialists), widest), float("-inf"), device=device)
        for m, (s, width) in enumerate(zip(specialists, self.widths)):
            self.weight[m, :width] = s.head.weight.detach()
            self.bias[m, :width] = s.head.bias.detach()
            self.bias[m, width - 1] += float(corrections[m])     # the dustbin correction, on the last logit

    def _features(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    @torch.no_grad()
    def log_probs(self, x: torch.Tensor, rows: torch.Tensor, models: torch.Tensor,
                  temperatures: torch.Tensor, max_rows: int = 512) -> torch.Tensor:
        """``[P, widest]`` log-probabilities of pair p = image ``x[rows[p]]`` under specialist
        ``models[p]`` (pairs sorted by specialist); columns past a specialist's width are -inf.
        ``x``: a normalised float batch on :attr:`device`; at most about ``max_rows`` padded rows
        go through one call."""
        if self.first.input_scale is not None:
            x = x * self.first.input_scale + self.first.input_shift
        counts = torch.bincount(models, minlength=len(self.widths))
        cap = 1 << max(0, int(counts[counts > 0].float().mean().ceil()) - 1).bit_length()   # power of 2 >= mean
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(len(models), device=models.device) - starts[models]
        slots_per_model = (counts + cap - 1) // cap
        first_slot = torch.cumsum(slots_per_model, 0) - slots_per_model
        slot = first_slot[models] + position // cap
        seat = position % cap
        num_slots = int(slots_per_model.sum())
        padded = x.new_zeros(num_slots, cap, *x.shape[1:])
        padded[slot, seat] = x[rows]
        slot_model = torch.repeat_interleave(torch.arange(len(self.widths), device=models.device), slots_per_model)
        widest = self.weight.shape[1]
        logits = torch.empty(num_slots, cap, widest, device=x.device)
        step = max(1, min(max_rows // cap, _GATHER_FLOATS // self.floats_per_model))
        for lo in range(0, num_slots, step):
            ids = slot_model[lo:lo + step].to(self.device)
            params = {k: v[ids] for k, v in self.params.items()}
            buffers = {k: v[ids] for k, v in self.buffers.items()}
            features = vmap(self._features)(params, buffers, padded[lo:lo + step]).float()   # [s, cap, F]
            logits[lo:lo + step] = torch.baddbmm(self.bias[ids].unsqueeze(1), features,
                                                 self.weight[ids].transpose(1, 2))
        pair_logits = logits[slot, seat]                                          # [P, widest]
        return torch.log_softmax(pair_logits / temperatures[models].unsqueeze(1), dim=1)
