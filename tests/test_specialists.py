"""Specialists: head initialisation, half/half sampler, dustbin correction, training, Ray fan-out."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
import torch

from specdistill.config import Config
from specdistill.data import Split
from specdistill.data.loading import train_loader
from specdistill.engine import fit, predict_logits
from specdistill.errors import SpecdistillError
from specdistill.models import build_model
from specialists import (
    SpecialistBatchSampler,
    corrected_log_probs,
    dustbin_correction,
    fold_labels,
    fold_logits,
    make_specialist,
    oversampling_factor,
    specialist_log_probs,
    train_one,
)
from specialists.dustbin import confusion_correction
from specialists.sampler import confusion_indices
from specialists.train import backbone_features, generalist_top_n

K, GROUP_SIZE, SIZE = 12, 3, 8


def blobs(n_train: int = 60, n_val: int = 30, seed: int = 0) -> tuple[Split, Split]:
    """Classes in planted look-alike families of 3: a family prototype plus a small class offset."""
    rng = np.random.default_rng(seed)
    family = rng.normal(0, 1, (K // GROUP_SIZE, SIZE * SIZE))
    proto = family.repeat(GROUP_SIZE, 0) + 0.35 * rng.normal(0, 1, (K, SIZE * SIZE))

    def split(n: int, s: int) -> Split:
        r = np.random.default_rng(s)
        y = np.repeat(np.arange(K), n)
        x = proto[y] + 0.9 * r.normal(0, 1, (len(y), SIZE * SIZE))
        return Split(np.clip(127.5 + 40 * x, 0, 255).astype(np.uint8).reshape(-1, SIZE, SIZE), y)

    return split(n_train, seed + 1), split(n_val, seed + 2)


@pytest.fixture(scope="module")
def trained():
    """A small MLP generalist on the blobs, and the config the specialists use."""
    torch.manual_seed(0)
    train, val = blobs()
    cfg = Config.model_validate({
        "device": "cpu", "data": {"augment": False},
        "generalist": {"model": {"name": "mlp", "hidden": [32]}},
        "specialists": {"train": {"epochs": 3, "lr": 0.05, "batch_size": 32}},
    })
    generalist = build_model(cfg.generalist.model, K, 1, SIZE)
    gcfg = cfg.generalist.train.model_copy(update={"epochs": 6, "lr": 0.05})
    fit(generalist, train_loader(train, 64, 0), val, gcfg, progress=False, device="cpu")
    return cfg, generalist.eval(), train, val


# ----------------------------------------------------------------------------------------------
# Head initialisation


def test_fold_logits_is_the_exact_fold_of_the_softmax():
    logits = torch.randn(5, 9) * 3
    classes = torch.tensor([4, 1, 7])
    folded = torch.softmax(fold_logits(logits, classes), 1)
    p = torch.softmax(logits, 1)
    outside = p.sum(1) - p[:, classes].sum(1)
    torch.testing.assert_close(folded, torch.cat([p[:, classes], outside[:, None]], 1))


@pytest.mark.parametrize("init", ["kl", "lstsq"])
def test_initial_specialist_is_the_generalist_restricted_to_its_group(trained, init):
    cfg, generalist, train, val = trained
    classes = [5, 3, 4]                                      # a planted family, in a scrambled order
    features = backbone_features(generalist, train.images, torch.device("cpu"))
    spec = make_specialist(generalist, classes, features, dustbin_init=init)
    baseline = make_specialist(generalist, classes, features, dustbin_init="constant")
    gen = predict_logits(generalist, val.images)
    out = predict_logits(spec, val.images)

    # within the group, on held-out examples of the group: the same predictions, the same accuracy
    inside = np.isin(val.labels, classes)
    local = torch.as_tensor(fold_labels(val.labels[inside], classes))
    gen_pred = gen[inside][:, classes].argmax(1)
    spec_pred = out[inside][:, :len(classes)].argmax(1)
    assert torch.equal(gen_pred, spec_pred)
    assert float((spec_pred == local).float().mean()) == float((gen_pred == local).float().mean())

    # the dustbin carries the generalist's outside mass, far better than a constant row
    gen_outside = torch.softmax(fold_logits(gen, torch.tensor(classes)), 1)[:, -1]
    def mae(logits):
        return float((torch.softmax(logits, 1)[:, -1] - gen_outside).abs().mean())
    assert mae(out) < 0.03, mae(out)
    assert mae(out) < 0.5 * mae(predict_logits(baseline, val.images))
    # and the generalist itself is untouched
    torch.testing.assert_close(predict_logits(generalist, val.images), gen)


def test_make_specialist_rejects_bad_groups(trained):
    _, generalist, train, _ = trained
    features = backbone_features(generalist, train.images[:64], torch.device("cpu"))
    with pytest.raises(SpecdistillError, match="useless"):
        make_specialist(generalist, [3], features)
    with pytest.raises(SpecdistillError, match="generalist has 12 classes"):
        make_specialist(generalist, [3, 12], features)
    with pytest.raises(SpecdistillError, match="twice"):
        make_specialist(generalist, [3, 3], features)
    with pytest.raises(SpecdistillError, match="dustbin"):
        make_specialist(generalist, list(range(K)), features)


# ----------------------------------------------------------------------------------------------
# Sampler


def test_sampler_gives_every_batch_the_asked_share_and_natural_proportions_outside():
    rng = np.random.default_rng(1)
    labels = rng.choice(20, 5000, p=np.linspace(1, 3, 20) / np.linspace(1, 3, 20).sum())
    classes = [2, 7, 11]
    sampler = SpecialistBatchSampler(labels, classes, batch_size=64, specialist_fraction=0.25, seed=3)
    inside = np.isin(labels, classes)
    n_group = int(inside.sum())
    assert sampler.group_per_batch == 16 and len(sampler) == math.ceil(n_group / 16)

    seen_other = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            assert len(batch) == 64 and inside[batch].sum() == 16
        group_drawn = np.concatenate([b[inside[b]] for b in batches])
        assert set(group_drawn) == set(np.flatnonzero(inside))       # every group example, each epoch
        seen_other.append(np.concatenate([b[~inside[b]] for b in batches]))
    # the remainder: no example twice before every one was drawn, classes in natural proportion
    stream = np.concatenate(seen_other)
    first_pass = stream[: (~inside).sum()]
    assert len(np.unique(first_pass)) == len(first_pass)
    others = [c for c in range(20) if c not in classes]
    natural = np.bincount(labels[~inside], minlength=20)[others] / (~inside).sum()
    drawn = np.bincount(labels[stream], minlength=20)[others] / len(stream)
    assert np.abs(drawn - natural).max() < 0.01

    # seeded: the same epoch gives the same batches, another epoch or seed does not
    sampler.set_epoch(2)
    again = list(sampler)
    sampler.set_epoch(3)
    assert not np.array_equal(np.concatenate(again), np.concatenate(list(sampler)))
    other_seed = SpecialistBatchSampler(labels, classes, 64, 0.25, seed=4)
    other_seed.set_epoch(2)
    assert not np.array_equal(np.concatenate(again), np.concatenate(list(other_seed)))
    sampler.set_epoch(2)
    assert all(np.array_equal(a, b) for a, b in zip(again, sampler))


def test_sampler_draws_the_asked_share_of_the_dustbin_from_confusions():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 20, 4000)
    classes = [2, 7, 11]
    top = np.where(rng.random(4000) < 0.1, rng.choice(classes, 4000), rng.integers(0, 20, 4000))[:, None]
    confused = confusion_indices(labels, top, classes)
    inside = np.isin(labels, classes)
    assert set(confused) == set(np.flatnonzero(~inside & np.isin(top[:, 0], classes)))
    sampler = SpecialistBatchSampler(labels, classes, 64, 0.5, seed=1, confusion_index=confused,
                                     confusion_fraction=0.25)
    assert sampler.confusion_per_batch == 8 and sampler.confusion_share == 0.25
    assert sampler.confusion_rate == pytest.approx(len(confused) / (~inside).sum())
    is_confused = np.zeros(len(labels), bool)
    is_confused[confused] = True
    drawn = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for batch in sampler:
            assert len(batch) == 64 and inside[batch].sum() == 32
            assert is_confused[batch[32:40]].all()              # the confusion slots
            drawn.append(batch[32:40])
    stream = np.concatenate(drawn)[:len(confused)]
    assert len(stream) > 100 and len(np.unique(stream)) == len(stream)   # none twice before all were drawn
    # confusion_fraction 0, or a group nothing is confused into: the paper's batches, unchanged
    plain = SpecialistBatchSampler(labels, classes, 64, 0.5, seed=1)
    for other in (SpecialistBatchSampler(labels, classes, 64, 0.5, seed=1, confusion_index=confused),
                  SpecialistBatchSampler(labels, classes, 64, 0.5, seed=1, confusion_index=np.zeros(0, int),
                                         confusion_fraction=0.5)):
        assert other.confusion_share == 0.0
        assert all(np.array_equal(a, b) for a, b in zip(plain, other))
    with pytest.raises(SpecdistillError, match="outside the group"):
        SpecialistBatchSampler(labels, classes, 64, confusion_index=np.flatnonzero(inside)[:3], confusion_fraction=0.5)


def test_confusion_correction_recovers_the_natural_posterior_where_the_specialist_is_consulted():
    """Batches: a share f from the group, the rest a share c of confusions (examples of other classes
    on which the generalist activates the specialist) and 1 - c at random. A perfect learner of that mix,
    corrected, gives the natural folded posterior on every input that activates the specialist."""
    rng = np.random.default_rng(3)
    k, n_x, classes = 9, 12, torch.tensor([1, 4, 6])
    prior = torch.tensor(rng.dirichlet(np.ones(k) * 2))
    likelihood = torch.tensor(rng.dirichlet(np.ones(n_x), size=k))          # p(x | y), rows sum to 1
    activated = torch.zeros(n_x, dtype=torch.bool)
    activated[[0, 2, 3, 7]] = True                                            # where top-n hits the group
    group = torch.zeros(k, dtype=torch.bool)
    group[classes] = True
    pi = float(prior[group].sum())
    r = float((prior[~group, None] * likelihood[~group][:, activated]).sum() / (1 - pi))
    f, c = 0.5, 0.4
    joint = torch.zeros(k, n_x, dtype=torch.float64)                          # the batches' p(y, x)
    joint[group] = f * prior[group, None] * likelihood[group] / pi
    joint[~group] = (1 - f) * prior[~group, None] * likelihood[~group] / (1 - pi) * (
        (1 - c) + c * activated.double() / r)
    learned = fold_logits(torch.log(joint / joint.sum(0)).T, classes)
    natural = prior[:, None] * likelihood
    want = torch.softmax(fold_logits(torch.log(natural / natural.sum(0)).T, classes), 1)
    correction = dustbin_correction(f, pi) - confusion_correction(c, r)
    got = corrected_log_probs(learned, correction).exp()
    torch.testing.assert_close(got[activated], want[activated].float(), rtol=1e-5, atol=1e-6)
    plain = corrected_log_probs(learned, dustbin_correction(f, pi)).exp()    # the paper's correction alone
    assert (plain[activated] - want[activated]).abs().max() > 0.05
    assert confusion_correction(0.0, r) == 0.0


def test_sampler_rejects_impossible_mixes():
    labels = np.repeat(np.arange(4), 10)
    with pytest.raises(SpecdistillError, match="no training examples"):
        SpecialistBatchSampler(labels, [7, 8], 16)
    with pytest.raises(SpecdistillError, match="dustbin"):
        SpecialistBatchSampler(labels, [0, 1, 2, 3], 16)
    with pytest.raises(SpecdistillError, match="batch"):
        SpecialistBatchSampler(labels, [0, 1], 1)


# ----------------------------------------------------------------------------------------------
# Dustbin correction


def test_dustbin_correction_hand_case():
    # the group is 10% of the data but half of every batch: oversampled 9x relative to the rest
    assert oversampling_factor(0.5, 0.1) == pytest.approx(9.0)
    assert dustbin_correction(0.5, 0.1) == pytest.approx(math.log(9.0))
    # batches in the natural proportion need no correction
    assert dustbin_correction(0.25, 0.25) == pytest.approx(0.0, abs=1e-12)
    # a group *under*-sampled relative to nature gets a negative correction
    assert dustbin_correction(0.2, 0.5) == pytest.approx(math.log(0.25))
    with pytest.raises(SpecdistillError):
        dustbin_correction(0.5, 0.0)


def test_dustbin_correction_recovers_the_natural_posterior_by_bayes_rule():
    """A perfectly trained specialist outputs the posterior under the *batch* prior; the
    correction must turn that into the natural folded posterior (and the dustbin's own ratio
    alone must not)."""
    rng = np.random.default_rng(0)
    k, classes = 10, torch.tensor([0, 3, 4])
    prior = torch.tensor(rng.dirichlet(np.ones(k) * 2))
    prior[classes] *= 0.1                                            # a rare group, as in practice
    prior = prior / prior.sum()
    likelihood = torch.tensor(rng.random((6, k)))                    # p(x | y) for 6 inputs
    natural = likelihood * prior
    natural = natural / natural.sum(1, keepdim=True)
    pi, f = float(prior[classes].sum()), 0.5
    batch_prior = prior.clone()                                      # group scaled to f, the rest to 1-f
    mask = torch.zeros(k, dtype=torch.bool)
    mask[classes] = True
    batch_prior[mask] *= f / pi
    batch_prior[~mask] *= (1 - f) / (1 - pi)
    learned = likelihood * batch_prior
    learned_logits = fold_logits(torch.log(learned / learned.sum(1, keepdim=True)), classes)
    want = torch.softmax(fold_logits(torch.log(natural), classes), 1)

    got = corrected_log_probs(learned_logits, dustbin_correction(f, pi)).exp()
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    half = corrected_log_probs(learned_logits, math.log((1 - pi) / (1 - f))).exp()
    assert (half - want).abs().max() > 0.05


def test_specialist_log_probs_applies_the_correction_once(trained):
    _, generalist, train, val = trained
    features = backbone_features(generalist, train.images[:256], torch.device("cpu"))
    spec = make_specialist(generalist, [0, 1, 2], features)
    raw = predict_logits(spec, val.images[:20])
    want = torch.log_softmax(raw + torch.tensor([0.0, 0.0, 0.0, 1.5]), 1)
    got = specialist_log_probs(spec, val.images[:20], 1.5)
    torch.testing.assert_close(got, want)
    from specdistill.data.loading import to_float

    as_float = specialist_log_probs(spec, to_float(torch.as_tensor(val.images[:20])), 1.5)
    torch.testing.assert_close(as_float, want)


# ----------------------------------------------------------------------------------------------
# Training one specialist (the pure function a Ray task runs)


def _task_inputs(cfg, generalist, train, val):
    """What a Ray task gets: the generalist as plain arrays + meta, and the data arrays."""
    state = {"tensors": {k: v.numpy() for k, v in generalist.state_dict().items()},
             "meta": {"model": cfg.generalist.model.model_dump(mode="json"), "num_classes": K,
                      "channels": 1, "image_size": SIZE}}
    data = {"train_images": train.images, "train_labels": train.labels,
            "val_images": val.images, "val_labels": val.labels}
    return state, data


def test_train_one_improves_the_group_and_the_correction_fixes_the_prior(trained):
    cfg, generalist, train, val = trained
    state, data = _task_inputs(cfg, generalist, train, val)
    result = train_one(state, {"id": 1, "classes": [3, 4, 5], "names": ["d", "e", "f"]}, data, cfg)
    m = result["metrics"]
    assert result["dustbin_correction"] == pytest.approx(math.log(3.0))     # f = 1/2, group = 1/4
    assert m["init_group_acc"] == m["generalist_group_acc"]
    assert m["val_group_examples"] == 90
    assert m["specialist_group_acc"] >= m["generalist_group_acc"]
    # on the natural class mix the corrected specialist is better calibrated than the raw one
    assert m["trained"]["nll_specialist"] < m["trained"]["nll_specialist_uncorrected"]
    assert result["model_meta"]["num_classes"] == 4
    assert result["tensors"]["head.weight"].shape == (4, 32)


def test_specialists_model_takes_the_generalists_keys_and_must_grow_from_it():
    from pydantic import ValidationError

    from specdistill.config import stage_hash

    gen = {"model": {"name": "resnet_cifar", "depth": 8, "width": 8}}
    plain = Config.model_validate({"generalist": gen})
    assert plain.specialists.model is None
    wide = Config.model_validate({"generalist": gen, "specialists": {"model": {"width": 16}}})
    assert wide.specialists.model == plain.generalist.model.model_copy(update={"width": 16})
    assert stage_hash(wide, "specialists") != stage_hash(plain, "specialists")
    assert stage_hash(wide, "clustering") == stage_hash(plain, "clustering")
    same = Config.model_validate({"generalist": gen, "specialists": {"model": gen["model"]}})
    assert same.specialists.model == plain.generalist.model
    for other in ({"width": 4}, {"depth": 14, "width": 16}, {"name": "mlp"}):
        with pytest.raises(ValidationError, match="specialists.model starts each specialist"):
            Config.model_validate({"generalist": gen, "specialists": {"model": other}})


def test_a_wider_specialist_starts_as_the_generalist_and_counts_its_compute(trained, tmp_path):
    from specdistill.models import load_classifier, save_classifier

    cfg, generalist, train, val = trained
    state, data = _task_inputs(cfg, generalist, train, val)
    wide = cfg.model_copy(update={"specialists": cfg.specialists.model_copy(
        update={"model": cfg.generalist.model.model_copy(update={"hidden": [96]})})})
    result = train_one(state, {"id": 1, "classes": [3, 4, 5], "names": ["d", "e", "f"]}, data, wide)
    m = result["metrics"]
    assert m["init_group_acc"] == m["generalist_group_acc"]          # widened: the generalist's function
    assert m["init"]["dustbin_mae"] < 0.05
    assert m["specialist_group_acc"] >= m["generalist_group_acc"]
    assert result["tensors"]["head.weight"].shape == (4, 96)
    assert result["model_meta"]["model"]["hidden"] == [96]
    assert m["macs_ratio"] == pytest.approx((64 * 96 + 96 * K) / (64 * 32 + 32 * K), rel=0.05)
    # the weights load back as the wider network from their own meta, as the combine stage reads them
    net = build_model(wide.specialists.model, 4, 1, SIZE)
    net.load_state_dict({k: torch.as_tensor(v) for k, v in result["tensors"].items()})
    save_classifier(tmp_path / "s.safetensors", net, result["model_meta"])
    loaded, _ = load_classifier(tmp_path / "s.safetensors", "cpu")
    torch.testing.assert_close(predict_logits(loaded, val.images), predict_logits(net, val.images))
    # the rivals count its images at their cost in generalist passes
    from generalist.rivals import specialist_images

    narrow = train_one(state, {"id": 1, "classes": [3, 4, 5], "names": ["d", "e", "f"]}, data, cfg)["metrics"]
    assert "macs_ratio" in narrow and narrow["macs_ratio"] == 1.0
    images, exact = specialist_images([{"metrics": m}, {"metrics": narrow}])
    assert exact and images == round(m["images_seen"] * m["macs_ratio"] + narrow["images_seen"])


def test_train_one_draws_its_dustbin_from_the_generalists_confusions(trained):
    cfg, generalist, train, val = trained
    state, data = _task_inputs(cfg, generalist, train, val)
    classes = [2, 3, 4]   # across two look-alike families: class 5's examples often put 3 or 4 in the top 2
    matched = cfg.model_copy(update={"specialists": cfg.specialists.model_copy(
        update={"confusion_fraction": 0.5, "confusion_top_n": 2})})
    with pytest.raises(SpecdistillError, match="train_top"):
        train_one(state, {"id": 1, "classes": classes, "names": ["d", "e", "f"]}, data, matched)
    top = generalist_top_n(state, train.images, 2, "cpu", batch_size=7)
    want = predict_logits(generalist, train.images).topk(2, dim=1).indices.numpy()
    assert np.array_equal(top, want)
    from specialists.fanout import with_train_top  # the stage computes it once, for every task

    assert "train_top" not in with_train_top(cfg, data, state)
    assert np.array_equal(with_train_top(matched, data, state)["train_top"], top)
    result = train_one(state, {"id": 1, "classes": classes, "names": ["d", "e", "f"]},
                       {**data, "train_top": top}, matched)
    confusions = result["metrics"]["confusions"]
    outside = ~np.isin(train.labels, classes)
    hits = outside & np.isin(top, classes).any(axis=1)
    assert confusions["examples"] == hits.sum() > 0
    assert confusions["rate"] == pytest.approx(hits.sum() / outside.sum())
    assert confusions["share_of_dustbin"] == 0.5
    assert result["dustbin_correction"] == pytest.approx(
        math.log(3.0) - math.log1p(0.5 * (1 / confusions["rate"] - 1)))


def test_head_epochs_train_the_head_alone_first_then_everything(trained, monkeypatch):
    import specialists.train as train_module

    cfg, generalist, train, val = trained
    state, data = _task_inputs(cfg, generalist, train, val)
    calls, real_fit = [], train_module.fit

    def spy(model, *args, **kwargs):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = real_fit(model, *args, **kwargs)
        calls.append({"epochs": args[2].epochs, "images": out["images_seen"],
                      "backbone_trains": [p.requires_grad for p in model.backbone.parameters()],
                      "backbone_moved": any(not torch.equal(before[k], v) for k, v in model.state_dict().items()
                                            if k.startswith("backbone.") and v.is_floating_point()
                                            and "running" not in k),
                      "head_moved": not torch.equal(before["head.weight"], model.state_dict()["head.weight"])})
        return out

    monkeypatch.setattr(train_module, "fit", spy)
    head_first = cfg.model_copy(update={"specialists": cfg.specialists.model_copy(update={"head_epochs": 2})})
    result = train_one(state, {"id": 1, "classes": [3, 4, 5], "names": ["d", "e", "f"]}, data, head_first)
    assert [c["epochs"] for c in calls] == [2, 3]
    assert not calls[0]["backbone_moved"] and calls[0]["head_moved"]      # phase 1: the head alone
    assert calls[1]["backbone_moved"]                                     # phase 2: everything
    assert all(calls[1]["backbone_trains"])                               # unfrozen again afterwards
    assert result["metrics"]["head_epochs"] == 2
    assert result["metrics"]["images_seen"] == calls[0]["images"] + calls[1]["images"]


# ----------------------------------------------------------------------------------------------
# The stage: bad input (no Ray needed), then the fan-out on a simulated two-node Ray cluster


SYNTHETIC = {"source": "synthetic", "num_classes": 12, "group_size": 3, "examples_per_class": 30,
             "image_size": 8, "augment": False}


def _stage_config(run_dir, **specialists) -> Config:
    return Config.model_validate({
        "name": "spec-test", "run_dir": str(run_dir), "device": "cpu", "data": SYNTHETIC,
        "generalist": {"model": {"name": "mlp", "hidden": [32]}},
        "specialists": {"train": {"epochs": 2, "batch_size": 32, "lr": 0.05}, "num_cpus_per_task": 1,
                        "max_retries": 3, **specialists},
    })


def _write_run(run_dir, groups=None) -> Config:
    """A run directory as stages 1-2 leave it: a small trained generalist and clusters.json."""
    from testkit.runs import write_generalist_and_groups

    cfg = _stage_config(run_dir)
    write_generalist_and_groups(cfg, run_dir, epochs=3, groups=groups)
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    _write_run(path)
    return path


def _with_groups(run_dir, tmp_path, groups):
    import shutil

    from specdistill.artifacts import read_json, write_json
    from specdistill.rundir import RunDir

    source, target = RunDir.at(run_dir), RunDir.at(tmp_path / "run")
    shutil.copytree(source.generalist, target.generalist)
    clusters = read_json(source.clusters)   # hand-edited on purpose: a file the record would not write
    clusters["groups"] = [{"id": m, "classes": g} for m, g in enumerate(groups)]
    write_json(target.clusters, clusters)
    return _stage_config(target.root)


@pytest.mark.parametrize("groups, message", [
    ([[0, 1, 2], [3, 40]], "group 1 names class 40 (the generalist has 12 classes)"),
    ([[0, 1, 2], [5]], "group 1: a group of 1 class"),
])
def test_bad_clusters_fail_before_ray_starts(run_dir, tmp_path, groups, message):
    from specialists.fanout import run_specialists

    cfg = _with_groups(run_dir, tmp_path, groups)
    with pytest.raises(SpecdistillError, match=re.escape(message)):
        run_specialists(cfg, progress=False, address="ray://nowhere:1")   # never reached
    assert not (cfg.run_path / "specialists" / "done.json").exists()


def test_missing_generalist_checkpoint_is_one_clear_line(tmp_path, capsys):
    from specialists.fanout import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--run-dir", str(tmp_path / "empty"), "--set", "data.source=synthetic"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing generalist checkpoint" in err[0] and "train it first" in err[0]


@pytest.fixture(scope="module")
def two_node_cluster():
    """A simulated cluster: a head and one worker node, one CPU each, small object stores."""
    import ray
    from ray.cluster_utils import Cluster

    small = 80 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": small, "include_dashboard": False,
        # notice a removed node within about a second instead of the production default
        "_system_config": {"health_check_period_ms": 300, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 0}})
    worker = cluster.add_node(num_cpus=1, object_store_memory=small)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def _specialist_files(run_path):
    import json

    spec = run_path / "specialists"
    return {p.name: json.loads(p.read_text()) for p in sorted(spec.glob("[0-9]*.json"))}


def test_fanout_survives_losing_a_node_and_a_rerun_trains_nothing(run_dir, two_node_cluster):
    import ray
    from ray._private.state import state as ray_state

    from specialists import load_specialists
    from specialists.fanout import run_specialists

    cluster, worker = two_node_cluster
    cfg = _stage_config(run_dir)
    removed = {}

    def on_written(m, done, total):
        if removed:
            return
        # wait until the worker node is busy with a specialist, then take the node away
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            per_node = ray_state.available_resources_per_node()
            busy = worker.node_id in per_node and per_node[worker.node_id].get("CPU", 0.0) == 0
            if busy:
                break
            time.sleep(0.05)
        removed["busy"] = busy
        cluster.remove_node(worker)
        removed["at"] = (done, total)

    summary = run_specialists(cfg, progress=False, on_written=on_written)
    assert removed["busy"] and removed["at"][0] < removed["at"][1]      # a node died mid-run
    assert summary["trained"] == 4 and summary["total"] == 4
    infos = _specialist_files(cfg.run_path)
    assert sorted(infos) == ["0000.json", "0001.json", "0002.json", "0003.json"]
    loaded = load_specialists(cfg.run_path)
    for (model, info), m in zip(loaded, range(4)):
        assert info.id == m and model.num_classes == 4
        assert info.dustbin_correction == pytest.approx(math.log(3.0))   # f = 1/2, each group 1/4
        assert info.metrics["init_group_acc"] == info.metrics["generalist_group_acc"]
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert worker.node_id not in alive

    # a rerun trains nothing new and leaves the files as they are
    before = {name: info["weights_sha256"] for name, info in infos.items()}
    again = run_specialists(cfg, progress=False)
    assert again["trained"] == 0 and again["skipped"] == 4
    assert {n: i["weights_sha256"] for n, i in _specialist_files(cfg.run_path).items()} == before

    # a damaged weights file is noticed and exactly that specialist is trained again, this time
    # with the workers loading the data themselves (where the data is read is not part of the key)
    weights = cfg.run_path / "specialists" / "0002.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    third = run_specialists(_stage_config(run_dir, load_data_on_workers=True), progress=False)
    assert third["trained"] == 1 and third["skipped"] == 3
    model, info = load_specialists(cfg.run_path)[2]
    assert info.metrics["val_group_examples"] == loaded[2][1].metrics["val_group_examples"]


def test_asking_for_gpus_on_a_cpu_cluster_fails_fast(run_dir, two_node_cluster):
    from specialists.fanout import run_specialists

    cfg = _stage_config(run_dir, num_gpus_per_task=1)
    cfg.device = "auto"
    began = time.monotonic()
    with pytest.raises(SpecdistillError, match=r"has no GPUs.*set specialists.num_gpus_per_task=0"):
        run_specialists(cfg, force=True, progress=False)
    assert time.monotonic() - began < 60
