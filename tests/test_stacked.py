"""combine.stacked: small specialists run as one batched network give what the one-at-a-time loop gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import combine.stacked as stacked
from combine.calibration import Calibration
from combine.ensemble import Ensemble
from specdistill.config import CombineConfig, ModelConfig
from specdistill.models import build_model
from specdistill.records import SpecialistInfo

K, SIZE = 12, 8
GROUPS = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9], [10, 11], [1, 4, 7]]


def _random_batch_norm(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Running statistics away from (0, 1), so a wrong buffer would show."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.3)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    return model.eval()


def ensemble(stack: bool, widths=None, names=None, normalise=False, batch_size=4) -> Ensemble:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    widths = widths or [4] * len(GROUPS)
    names = names or ["resnet_cifar"] * len(GROUPS)

    def model(name: str, width: int, classes: int):
        m = build_model(ModelConfig(name=name, depth=8, width=width, hidden=[16]), classes, 1, SIZE)
        if normalise:
            m.set_input_normalization([0.4], [0.2])
        return _random_batch_norm(m, gen)

    specialists = [model(name, width, len(g) + 1) for name, width, g in zip(names, widths, GROUPS)]
    infos = [SpecialistInfo(id=m, classes=g, names=[str(c) for c in g], dustbin_correction=0.3 * m - 0.5)
             for m, g in enumerate(GROUPS)]
    ens = Ensemble(model("resnet_cifar", 4, K), K, specialists, infos, batch_size=batch_size, stack=stack)
    ens.calibration = Calibration(1.3, [0.7, 1.0, 1.6, 2.2, 0.9])
    return ens


def images(n: int = 40) -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, size=(n, SIZE, SIZE), dtype=np.uint8)


def test_stacked_specialists_give_the_loops_outputs_on_float_and_uint8_batches():
    looped, batched = ensemble(stack=False), ensemble(stack=True)
    assert batched._stacked is None   # built on first use only: the combine stage never needs it
    assert looped.stacked_specialists() is None and batched.stacked_specialists() is not None
    x = images()
    active = torch.as_tensor(np.random.default_rng(3).random((len(x), len(GROUPS))) < 0.35)
    active[:, 3] = False   # a specialist nobody activates
    active[:, 2] = True    # one that every row activates: several slots, several batched calls
    floats = torch.as_tensor(x).unsqueeze(1).float() / 127.5 - 1.0
    for batch in (x, floats):
        want, got = looped.specialist_outputs(batch, active), batched.specialist_outputs(batch, active)
        for m, (w, g) in enumerate(zip(want, got)):
            assert g.shape == w.shape == (len(x), len(GROUPS[m]) + 1)
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
            assert torch.all(g[~active[:, m]] == 0)
            assert torch.allclose(g[active[:, m]].exp().sum(1), torch.ones(int(active[:, m].sum())))
    silent = torch.zeros_like(active)   # a gate that closes every specialist
    assert all(torch.all(g == 0) for g in batched.specialist_outputs(x, silent))
    rule = CombineConfig(top_n=2)
    torch.testing.assert_close(batched.log_probs(x, rule), looped.log_probs(x, rule), atol=1e-4, rtol=1e-4)


def test_input_normalisation_is_applied_once():
    looped, batched = ensemble(stack=False, normalise=True), ensemble(stack=True, normalise=True)
    x, active = images(16), torch.ones(16, len(GROUPS), dtype=torch.bool)
    for w, g in zip(looped.specialist_outputs(x, active), batched.specialist_outputs(x, active)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["widths", "families", "large"])
def test_specialists_that_cannot_be_stacked_keep_the_loop(case, monkeypatch):
    widths = [4, 4, 8, 4, 4] if case == "widths" else None
    names = ["resnet_cifar", "mlp", "resnet_cifar", "resnet_cifar", "resnet_cifar"] if case == "families" else None
    if case == "large":
        monkeypatch.setattr(stacked, "MAX_PARAMETERS", 100)
    ens = ensemble(stack=True, widths=widths, names=names)
    assert not stacked.stackable(ens.specialists) and ens.stacked_specialists() is None
    x = images(8)
    assert ens.log_probs(x, CombineConfig(top_n=2)).shape == (8, K)


def test_one_specialist_or_other_models_are_not_stackable():
    ens = ensemble(stack=True)
    assert stacked.stackable(ens.specialists)
    assert not stacked.stackable(ens.specialists[:1])
    assert not stacked.stackable([*ens.specialists[:2], torch.nn.Linear(3, 3)])
