"""The distillation losses against numbers worked out by hand, the T^2 gradient argument, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from specdistill.errors import SpecdistillError
from specdistill.kd import LOSSES, Distiller, build_loss

torch.set_num_threads(1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _hinton_numpy(z: np.ndarray, v: np.ndarray, y: np.ndarray, t: float, alpha: float) -> float:
    q, p = _softmax(v / t), _softmax(z / t)
    kl = (q * np.log(q / p)).sum(axis=1).mean()
    ce = -np.log(_softmax(z)[np.arange(len(y)), y]).mean()
    return alpha * t * t * kl + (1 - alpha) * ce


def _total(terms: dict[str, torch.Tensor]) -> float:
    return float(sum(terms.values()))


def test_registry_names():
    assert set(LOSSES.names()) == {"hinton", "logit_matching", "noisy_teacher", "hard"}
    with pytest.raises(SpecdistillError, match="unknown distillation loss 'kld'"):
        build_loss("kld")


def test_hinton_small_case_by_hand():
    # z = [1, 0, -1], teacher logits v = [2, 0, 0], T = 2, alpha = 0.5, label 0.
    # q_T = softmax([1, 0, 0]) = [e, 1, 1] / (e + 2) = [0.576117, 0.211942, 0.211942]
    # p_T = softmax([.5, 0, -.5]) = [0.506480, 0.307196, 0.186324]
    # KL = 0.576117 ln(0.576117/0.506480) + 0.211942 ln(0.211942/0.307196)
    #      + 0.211942 ln(0.211942/0.186324) = 0.074218 - 0.078667 + 0.027303 = 0.022854
    # kd = alpha T^2 KL = 0.5 * 4 * 0.022854 = 0.045708
    # CE = ln(e + 1 + 1/e) - 1 = 0.407606, ce = 0.5 * 0.407606 = 0.203803
    z = torch.tensor([[1.0, 0.0, -1.0]])
    v = torch.tensor([[2.0, 0.0, 0.0]])
    y = torch.tensor([0])
    terms = build_loss("hinton", temperature=2.0, alpha=0.5)(z, v, y)
    assert set(terms) == {"kd", "ce"}
    assert terms["kd"].item() == pytest.approx(0.045708, abs=2e-6)
    assert terms["ce"].item() == pytest.approx(0.203803, abs=2e-6)


def test_hinton_log_prob_teacher_equals_logit_teacher_and_matches_numpy():
    rng = np.random.default_rng(0)
    z, v = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    y = rng.integers(0, 7, size=5)
    log_q = v - np.log(np.exp(v).sum(axis=1, keepdims=True))
    loss = build_loss("hinton", temperature=3.0, alpha=0.7)
    from_logits = _total(loss(torch.tensor(z), torch.tensor(v), torch.tensor(y)))
    from_log_probs = _total(loss(torch.tensor(z), torch.tensor(log_q), torch.tensor(y)))
    assert from_logits == pytest.approx(from_log_probs, rel=1e-5)
    assert from_logits == pytest.approx(_hinton_numpy(z, v, y, 3.0, 0.7), rel=1e-5)


def test_hinton_alpha_extremes_drop_the_unused_term():
    z, v, y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    assert set(build_loss("hinton", alpha=1.0)(z, v, y)) == {"kd"}
    assert set(build_loss("hinton", alpha=0.0)(z, v, y)) == {"ce"}


def test_hard_loss_is_cross_entropy_by_hand():
    # softmax([2, 0]) picks label 1 with probability 1 / (1 + e^2): CE = ln(1 + e^2) = 2.126928
    terms = build_loss("hard")(torch.tensor([[2.0, 0.0]]), None, torch.tensor([1]))
    assert set(terms) == {"ce"}
    assert terms["ce"].item() == pytest.approx(2.126928, abs=1e-6)


def test_logit_matching_by_hand_and_offset_free():
    # z = [1, 0, -1] (mean 0); v = [2, 0, 0] centred = [4/3, -2/3, -2/3]
    # diff = [-1/3, 2/3, -1/3]; mean square = 6/27 = 2/9; loss = 1/2 * 2/9 = 1/9
    z = torch.tensor([[1.0, 0.0, -1.0]])
    v = torch.tensor([[2.0, 0.0, 0.0]])
    loss = build_loss("logit_matching", alpha=1.0)
    terms = loss(z, v, torch.tensor([0]))
    assert set(terms) == {"mse"}
    assert terms["mse"].item() == pytest.approx(1 / 9, abs=1e-7)
    # a log-prob teacher (v minus a per-example constant) and a shifted student give the same loss
    log_q = torch.log_softmax(v, dim=1)
    assert _total(loss(z + 5.0, log_q, torch.tensor([0]))) == pytest.approx(1 / 9, abs=1e-6)


def test_logit_matching_is_the_high_temperature_limit_of_hinton():
    torch.manual_seed(0)
    z, v = torch.randn(8, 10, dtype=torch.float64) * 3, torch.randn(8, 10, dtype=torch.float64) * 3
    y = torch.zeros(8, dtype=torch.long)
    mse = _total(build_loss("logit_matching", alpha=1.0)(z, v, y))
    kd = _total(build_loss("hinton", temperature=1000.0, alpha=1.0)(z, v, y))
    assert kd == pytest.approx(mse, rel=2e-3)
    kd_low = _total(build_loss("hinton", temperature=1.0, alpha=1.0)(z, v, y))
    assert abs(kd_low - mse) / mse > 0.2  # the limit is not trivially true at every T


def _soft_grad_norm(z: torch.Tensor, v: torch.Tensor, t: float, scaled: bool) -> float:
    z = z.clone().requires_grad_(True)
    kd = build_loss("hinton", temperature=t, alpha=1.0)(z, v, torch.zeros(len(z), dtype=torch.long))["kd"]
    if not scaled:
        kd = kd / (t * t)
    (grad,) = torch.autograd.grad(kd, z)
    return grad.norm().item()


def test_soft_gradient_magnitude_roughly_constant_across_temperature():
    torch.manual_seed(1)
    z, v = torch.randn(16, 20, dtype=torch.float64) * 2, torch.randn(16, 20, dtype=torch.float64) * 2
    temps = [1, 2, 4, 8, 12, 20]
    scaled = {t: _soft_grad_norm(z, v, t, scaled=True) for t in temps}
    high = [scaled[t] for t in temps if t >= 4]
    assert max(high) / min(high) < 2.0
    assert max(scaled.values()) / min(scaled.values()) < 4.0
    # ... and tends to the logit-matching gradient (c(z) - c(v)) / K / batch as T grows
    limit = ((z - z.mean(1, keepdim=True)) - (v - v.mean(1, keepdim=True))).norm().item() / (20 * 16)
    assert scaled[20] == pytest.approx(limit, rel=0.1)
    # without T^2 the soft term's gradient would shrink like 1/T^2: the reason for the factor
    unscaled = {t: _soft_grad_norm(z, v, t, scaled=False) for t in (1, 20)}
    assert unscaled[1] / unscaled[20] > 50


def test_noisy_teacher_without_noise_or_in_eval_is_hinton():
    torch.manual_seed(2)
    z, v, y = torch.randn(6, 5), torch.randn(6, 5), torch.arange(6) % 5
    hinton = _total(build_loss("hinton", temperature=3.0, alpha=0.6)(z, v, y))
    quiet = build_loss("noisy_teacher", temperature=3.0, alpha=0.6, noise_std=0.0)
    assert _total(quiet(z, v, y)) == pytest.approx(hinton, rel=1e-6)
    noisy = build_loss("noisy_teacher", temperature=3.0, alpha=0.6, noise_std=0.5).eval()
    assert _total(noisy(z, v, y)) == pytest.approx(hinton, rel=1e-6)
    noisy.train()
    assert abs(_total(noisy(z, v, y)) - hinton) > 1e-4


def test_noisy_teacher_noise_is_multiplicative_with_the_configured_scale_and_fraction():
    torch.manual_seed(3)
    v = torch.randn(4000, 8) * 3
    vc = v - v.mean(1, keepdim=True)
    loss = build_loss("noisy_teacher", noise_std=0.2, noise_fraction=0.5).train()
    ratio = loss.teacher_logits(v) / vc - 1
    untouched = (ratio.abs() < 1e-5).all(dim=1)
    assert 0.45 < untouched.float().mean().item() < 0.55
    assert ratio[~untouched].std().item() == pytest.approx(0.2, rel=0.05)


@pytest.mark.parametrize("name", ["hinton", "noisy_teacher"])
@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_one_clear_line(name, temperature):
    with pytest.raises(SpecdistillError, match="temperature") as info:
        build_loss(name, temperature=temperature)
    assert "\n" not in str(info.value) and "student.loss.temperature" in str(info.value)


@pytest.mark.parametrize("name", ["hinton", "noisy_teacher", "logit_matching"])
@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_bad_alpha_is_one_clear_line(name, alpha):
    with pytest.raises(SpecdistillError, match=r"alpha=.* must lie in \[0, 1\]") as info:
        build_loss(name, alpha=alpha)
    assert "\n" not in str(info.value)


def test_bad_noise_is_one_clear_line():
    with pytest.raises(SpecdistillError, match="noise_std"):
        build_loss("noisy_teacher", noise_std=-1.0)
    with pytest.raises(SpecdistillError, match="noise_fraction"):
        build_loss("noisy_teacher", noise_fraction=2.0)


@pytest.mark.parametrize("name", ["hinton", "noisy_teacher", "logit_matching"])
def test_class_count_mismatch_is_one_clear_line(name):
    with pytest.raises(SpecdistillError, match="teacher scores 12 classes but the student 10") as info:
        build_loss(name)(torch.randn(3, 10), torch.randn(3, 12), torch.zeros(3, dtype=torch.long))
    assert "\n" not in str(info.value)


def test_missing_teacher_is_one_clear_line():
    with pytest.raises(SpecdistillError, match="needs teacher targets"):
        build_loss("hinton")(torch.randn(3, 4), None, torch.zeros(3, dtype=torch.long))
    with pytest.raises(SpecdistillError, match="needs a teacher"):
        Distiller(nn.Linear(4, 4), build_loss("hinton"), teacher=None)


class _TableTeacher:
    """Cached-teacher stand-in: a fixed table of log-probs looked up by example index."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def lookup(self, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.table[index]


def test_distiller_pins_a_live_teacher_in_eval_mode_without_grad():
    torch.manual_seed(4)
    teacher = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 3))
    student = nn.Linear(6, 3)
    distiller = Distiller(student, build_loss("hinton", temperature=2.0, alpha=0.5), teacher)
    distiller.train()
    assert student.training and not teacher.training
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    logits, terms = distiller.forward_train(x, y, torch.arange(5))
    assert set(terms) == {"kd", "ce"} and logits.shape == (5, 3)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # eval-mode teacher: two calls agree (dropout is off), so the targets are deterministic
    _, again = distiller.forward_train(x, y, torch.arange(5))
    assert math.isclose(terms["kd"].item(), again["kd"].item(), rel_tol=1e-6)


def test_distiller_objective_uses_cached_targets_by_index():
    torch.manual_seed(5)
    table = torch.log_softmax(torch.randn(10, 4), dim=1)
    student = nn.Linear(3, 4)
    loss = build_loss("hinton", temperature=1.0, alpha=1.0)
    distiller = Distiller(student, loss, _TableTeacher(table))
    x, y, index = torch.randn(3, 3), torch.zeros(3, dtype=torch.long), torch.tensor([7, 2, 9])
    logits, terms = distiller.objective(student, x, y, index)
    expected = loss(logits, table[index], y)["kd"]
    assert terms["kd"].item() == pytest.approx(expected.item())
    with pytest.raises(SpecdistillError, match="indices"):
        distiller.objective(student, x, y, None)


class _Recorder(nn.Module):
    """A live teacher that remembers the images it scored."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.seen = k, []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.clone())
        return torch.log_softmax(images.flatten(1)[:, :self.k] * 3, dim=1)


def test_mixup_trains_the_student_and_the_live_teacher_on_the_same_mixed_images():
    """student.mixup: each training image becomes lam x_i + (1 - lam) x_j (lam >= 0.5), the live teacher
    scores exactly those images, the labels are mixed alike; evaluation and mixup=0 leave the batch alone."""
    torch.manual_seed(6)
    k, b = 4, 64
    x, y = torch.randn(b, 8), torch.randint(0, k, (b,))
    teacher, student = _Recorder(k), nn.Linear(8, k)
    loss = build_loss("hinton", temperature=2.0, alpha=0.5)
    distiller = Distiller(student, loss, teacher, mixup=1.0)
    student.train()
    logits, terms = distiller.objective(student, x, y, torch.arange(b))
    seen = teacher.seen[-1]
    assert not torch.equal(seen, x)
    assert torch.equal(logits, student(seen))            # the student saw the teacher's images
    # every row is a convex mix of its own image (weight >= 0.5) and one other image of the batch
    lams, partners = [], []
    for i in range(b):
        for j in range(b):
            d = x[i] - x[j]
            lam = float(((seen[i] - x[j]) @ d) / (d @ d)) if j != i else 1.0
            if torch.allclose(seen[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5):
                lams.append(lam), partners.append(j)
                break
        else:
            pytest.fail(f"row {i} is not a mix of two batch images")
    lams = np.array(lams)
    assert lams.min() >= 0.5 - 1e-5 and lams.max() <= 1 + 1e-5 and lams.std() > 0.05   # drawn per example
    # the hard term is the cross-entropy against the same mix of the one-hot labels
    soft = torch.stack([lam * nn.functional.one_hot(y[i], k) + (1 - lam) * nn.functional.one_hot(y[j], k)
                        for i, (lam, j) in enumerate(zip(lams.tolist(), partners))]).float()
    expected = loss(logits, teacher(seen), soft)
    for name in ("kd", "ce"):
        assert terms[name].item() == pytest.approx(expected[name].item(), rel=1e-4)
    student.eval()
    distiller.objective(student, x, y, torch.arange(b))
    assert torch.equal(teacher.seen[-1], x)               # no mixing when not training
    student.train()
    Distiller(student, loss, teacher).objective(student, x, y, torch.arange(b))
    assert torch.equal(teacher.seen[-1], x)               # mixup=0: off


def test_mixup_mixes_cached_targets_like_the_labels():
    """Cached targets cannot score a mixed image: they are mixed in probability, lam q_i + (1 - lam) q_j."""
    from specdistill.kd import Mix

    torch.manual_seed(7)
    table = torch.log_softmax(torch.randn(6, 5) * 4, dim=1)
    mix = Mix.draw(6, 0.4, "cpu")
    assert torch.all(mix.lam >= 0.5) and sorted(mix.partner.tolist()) == list(range(6))
    lam = mix.lam.unsqueeze(1)
    torch.testing.assert_close(mix.log_probs(table).exp(), lam * table.exp() + (1 - lam) * table.exp()[mix.partner])
    student = nn.Linear(3, 5)
    loss = build_loss("hinton", temperature=1.0, alpha=1.0)
    distiller = Distiller(student, loss, _TableTeacher(table), mixup=0.4)
    torch.manual_seed(8)
    logits, terms = distiller.objective(student, torch.randn(6, 3), torch.zeros(6, dtype=torch.long), torch.arange(6))
    torch.manual_seed(8)
    torch.randn(6, 3)
    again = Mix.draw(6, 0.4, "cpu")                       # the same draw the distiller made
    assert terms["kd"].item() == pytest.approx(loss(logits, again.log_probs(table), None)["kd"].item(), rel=1e-5)


@pytest.mark.parametrize("mixup", [-0.5, float("nan")])
def test_bad_mixup_is_one_clear_line(mixup):
    with pytest.raises(SpecdistillError, match="student.mixup"):
        Distiller(nn.Linear(2, 2), build_loss("hard"), mixup=mixup)
