"""Synthetic generalist + specialist outputs with the structure of a real ensemble, at any K.

Groups are blocks of a random class order widened into their neighbours' blocks, so they overlap
like the paper's (61 groups of 300 over 15,000 classes cover a class ~1.2 times). Each example has
a true class; the generalist is right about two thirds of the time and otherwise confuses the
class with mates from its block; a specialist sharpens the generalist inside its group and puts
the mass of the other classes, plus a margin when the true class is elsewhere, in its dustbin.
"""

from __future__ import annotations

import numpy as np
import torch


def make_groups(num_classes: int, num_groups: int, group_size: int, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_classes)
    blocks = np.array_split(np.arange(num_classes), num_groups)
    groups = []
    for block in blocks:
        extra = max(0, group_size - len(block))
        lo = max(0, block[0] - extra // 2)
        hi = min(num_classes, lo + max(group_size, len(block)))
        lo = max(0, hi - max(group_size, len(block)))
        groups.append(torch.as_tensor(order[lo:hi]).sort().values)
    return groups


def make_outputs(num_classes: int, groups: list[torch.Tensor], num_examples: int, seed: int = 0,
                 dtype=torch.float32):
    """(gen_log_probs [B, K], spec_log_probs: one [B, |S|+1] per group, labels [B])."""
    rng = np.random.default_rng(seed)
    K, B = num_classes, num_examples
    home = np.zeros(K, dtype=np.int64)           # one group per class, for its confusable mates
    for m, g in enumerate(groups):
        home[g.numpy()] = m
    labels = rng.integers(0, K, B)
    logits = rng.normal(0.0, 1.0, (B, K))
    logits[np.arange(B), labels] += rng.normal(5.0, 2.0, B)
    for b in range(0, B):                         # a few look-alikes from the same group
        mates = rng.choice(groups[home[labels[b]]].numpy(), 4)
        logits[b, mates] += rng.normal(4.0, 1.5, 4)
    gen = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    specs = []
    for g in groups:
        idx = g.numpy()
        inside = logits[:, idx] * 1.5 + rng.normal(0.0, 0.5, (B, len(idx)))
        member = np.isin(labels, idx)
        inside[member, np.searchsorted(idx, labels[member])] += 2.0
        p_in = torch.exp(gen[:, idx]).sum(dim=1).clamp(max=1 - 1e-12)
        outside = torch.log1p(-p_in).numpy()          # the generalist's mass outside the group
        dust = outside + np.where(member, -1.0, 1.0) + rng.normal(0, 1, B)
        # the dustbin logit on the scale of the inside logits: log-sum-exp of inside + log odds
        lse_in = np.logaddexp.reduce(inside, axis=1)
        p_out = np.exp(np.clip(dust, -50, 0))
        dust_logit = lse_in + np.log(p_out) - np.log1p(-np.minimum(p_out, 1 - 1e-12))
        out = np.concatenate([inside, dust_logit[:, None]], axis=1)
        specs.append(torch.log_softmax(torch.as_tensor(out, dtype=torch.float64), dim=1).to(dtype))
    return gen.to(dtype), specs, torch.as_tensor(labels)
