"""The student stage: teacher cache, teachers, learning from soft targets, the stage end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from specdistill.artifacts import read_json
from specdistill.config import Config, ModelConfig, StudentLossConfig, TrainConfig, load_config, stage_hash
from specdistill.data import Dataset, Split
from specdistill.data.loading import to_float, train_loader
from specdistill.engine import evaluate, fit
from specdistill.errors import SpecdistillError
from specdistill.kd import Distiller, build_loss
from specdistill.models import build_model, count_flops
from specdistill.provenance import mark_done
from specdistill.records import CombineResult, SpecialistInfo, SplitEvaluation
from specdistill.rundir import RunDir
from student.cache import TeacherCache, build_cache, cache_key, compress, load_cache, load_or_build
from student.teachers import average_log_probs
from student.train import StudentPlan, _run_folder, plan_students, train_one

torch.set_num_threads(1)


def _random_log_probs(n: int, k: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, k, generator=g) * scale, dim=1)


# ----------------------------------------------------------------------------------------------
# cache


def test_compress_keeps_top_k_and_the_exact_tail_mass():
    log_q = _random_log_probs(50, 40)
    top, idx, residual, classes = compress(log_q, 5)
    assert top.dtype == np.float16 and idx.dtype == np.int32 and residual.dtype == np.float32
    assert classes.dtype == np.float32 and np.all((classes >= 1) & (classes <= 35))
    q = log_q.exp().numpy()
    expected_idx = np.argsort(-q, axis=1)[:, :5]
    assert np.array_equal(np.sort(idx, 1), np.sort(expected_idx, 1))
    tail = q.sum(1) - np.take_along_axis(q, expected_idx, 1).sum(1)
    assert np.allclose(residual, tail, rtol=1e-4, atol=1e-7)
    # a row whose top-k holds nearly everything: the tail is tiny but not cancelled to zero
    peaked = torch.log_softmax(torch.tensor([[30.0, 0.0, 0.0, 0.0]]), dim=1)
    _, _, res, even = compress(peaked, 1)
    assert res[0] == pytest.approx(3 * np.exp(-30.0), rel=1e-3)
    assert even[0] == pytest.approx(3.0, rel=1e-4)   # an even tail over 3 classes: 3 effective classes


def test_cache_round_trip(tmp_path):
    log_q = _random_log_probs(64, 12, seed=1)
    images = np.arange(64, dtype=np.uint8).reshape(64, 1, 1)  # the teacher looks rows up by pixel

    def teacher(batch: np.ndarray) -> torch.Tensor:
        return log_q[torch.as_tensor(batch[:, 0, 0].astype(np.int64))]

    full = build_cache(teacher, images, top_k=12, key="k1", batch_size=10, progress=False)
    full.save(tmp_path / "full")
    back = load_cache(tmp_path / "full", "k1")
    index = torch.tensor([0, 5, 63, 17])
    assert torch.allclose(back.lookup(index), log_q[index], atol=5e-3)   # float16 rounding only

    small = build_cache(teacher, images, top_k=3, key="k3", batch_size=10, progress=False)
    small.save(tmp_path / "small")
    dense = load_cache(tmp_path / "small", "k3").lookup(index)
    q = log_q[index].exp()
    top = q.topk(3, dim=1)
    got = dense.exp()
    assert torch.allclose(got.gather(1, top.indices), top.values, rtol=5e-3)
    assert torch.allclose(got.sum(1), torch.ones(4), atol=1e-5)
    # the tail keeps its total mass, spread evenly over the other 9 classes
    tail = q.sum(1) - top.values.sum(1)
    others = got.scatter(1, top.indices, 0.0)
    assert torch.allclose(others.sum(1), tail, rtol=5e-3)
    assert torch.allclose(others.max(1).values, tail / 9, rtol=5e-3)
    assert json.loads((tmp_path / "small" / "cache.json").read_text())["top_k"] == 3


def test_stale_cache_is_refused_or_rebuilt(tmp_path):
    log_q = _random_log_probs(20, 6, seed=2)
    images = np.zeros((20, 2, 2), dtype=np.uint8)
    calls = []

    def factory(tag):
        def make():
            calls.append(tag)
            return lambda batch: log_q[: len(batch)] if tag == "a" else log_q.flip(1)[: len(batch)]

        return make

    a = load_or_build(tmp_path, {"teacher": "a"}, factory("a"), images, top_k=2, progress=False)
    again = load_or_build(tmp_path, {"teacher": "a"}, factory("a"), images, top_k=2, progress=False)
    assert calls == ["a"] and torch.equal(a.lookup(torch.arange(3)), again.lookup(torch.arange(3)))
    with pytest.raises(SpecdistillError, match="built for another teacher config") as info:
        load_cache(tmp_path, cache_key({"teacher": "b", "top_k": 2}))
    assert "\n" not in str(info.value)
    b = load_or_build(tmp_path, {"teacher": "b"}, factory("b"), images, top_k=2, progress=False)
    assert calls == ["a", "b"] and b.key != a.key
    assert not torch.allclose(b.lookup(torch.arange(3)), a.lookup(torch.arange(3)))
    # another top_k is another config too
    load_or_build(tmp_path, {"teacher": "b"}, factory("b"), images, top_k=3, progress=False)
    assert calls == ["a", "b", "b"]


def test_cache_lookup_outside_the_split_is_a_clear_error():
    cache = TeacherCache(*compress(_random_log_probs(4, 5), 2), num_classes=5, key="x")
    with pytest.raises(SpecdistillError, match="has 4 examples"):
        cache.lookup(torch.tensor([4]))


def test_average_of_generalists_is_the_mean_distribution():
    a = torch.log(torch.tensor([[0.5, 0.5, 1e-30]]))
    b = torch.log(torch.tensor([[0.1, 0.3, 0.6]]))
    assert torch.allclose(average_log_probs([a, b]).exp(), torch.tensor([[0.3, 0.4, 0.3]]), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# learning from soft targets alone


def _blocks(n: int, seed: int, noise: float = 60.0, signal: float = 255.0) -> Split:
    """10 classes, each brightening its own 8x3 block of a noisy 16x16 image by ``signal``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.random((n, 16, 16)) * noise
    for i, y in enumerate(labels):
        images[i, (y // 5) * 8:(y // 5) * 8 + 8, (y % 5) * 3:(y % 5) * 3 + 3] += signal
    return Split(np.clip(images, 0, 255).astype(np.uint8), labels)


def test_student_learns_from_soft_targets_alone():
    train, val = _blocks(300, 0), _blocks(200, 1)
    # soft targets: 0.5 on the true class, the rest spread over the others unevenly
    rng = np.random.default_rng(2)
    q = rng.dirichlet(np.ones(10), size=len(train)) * 0.5
    q[np.arange(len(train)), train.labels] += 0.5
    cache = TeacherCache(*compress(torch.log(torch.as_tensor(q, dtype=torch.float32)), 10), 10, "soft")
    torch.manual_seed(0)
    student = build_model(ModelConfig(name="mlp", hidden=[64]), 10, 1, 16)
    distiller = Distiller(student, build_loss("hinton", temperature=2.0, alpha=1.0), cache)
    # the labels the loop sees are shuffled: only the soft targets carry the classes
    garbage = rng.permutation(train.labels)
    cfg = TrainConfig(epochs=6, batch_size=32, lr=0.05, amp=False)
    fit(student, train_loader(train, 32, labels=garbage), None, cfg, objective=distiller.objective,
        progress=False)
    acc = evaluate(student, val)["acc"]
    print(f"soft-targets-only student: val accuracy {acc:.3f}")
    assert acc > 0.6   # chance is 0.1


# ----------------------------------------------------------------------------------------------
# plans and bad input


def _cfg(tmp_path, **student) -> Config:
    tree = {
        "name": "t", "run_dir": str(tmp_path / "run"), "device": "cpu",
        "data": {"source": "synthetic", "image_size": 16, "augment": False},
        "generalist": {"model": {"name": "mlp", "hidden": [64]},
                       "train": {"epochs": 3, "batch_size": 32, "lr": 0.05, "amp": False}},
        "student": {"model": {"name": "mlp", "hidden": [32]},
                    "train": {"epochs": 8, "batch_size": 32, "lr": 0.05, "amp": False},
                    "loss": {"name": "hinton", "temperature": 2.0, "alpha": 0.7}, "cache_top_k": 4,
                    **student},
    }
    from specdistill.config import validate_config

    return validate_config(tree)


def test_plans_dedupe_baselines_and_chain_the_assistant(tmp_path):
    names = [p.name for p in plan_students(_cfg(tmp_path, teacher="ensemble"))]
    assert names == ["student", "hard", "from-generalist"]   # from-ensemble is the student itself
    plans = plan_students(_cfg(tmp_path, teacher="ensemble", baselines=False,
                               assistant={"name": "mlp", "hidden": [48]}))
    assert [(p.name, p.teacher) for p in plans] == [("assistant", "ensemble"), ("student", "assistant")]
    chosen = plan_students(_cfg(tmp_path, teacher="ensemble", baselines=["hard", "from-ensemble"]))
    assert [p.name for p in chosen] == ["student", "hard"]
    # the hard-label baseline ignores the temperature: a new T reuses its run, but not the student's
    cfg_t1 = _cfg(tmp_path, teacher="ensemble", baselines=["hard"], loss={"temperature": 1.0})
    cfg_t4 = _cfg(tmp_path, teacher="ensemble", baselines=["hard"], loss={"temperature": 4.0})
    folders = [[_run_folder(p, "k", c, "data") for p in plan_students(c)] for c in (cfg_t1, cfg_t4)]
    assert folders[0][1] == folders[1][1] and folders[0][0] != folders[1][0]
    assert plan_students(cfg_t1)[1] == plan_students(cfg_t4)[1]     # so its checkpoint resumes too
    hard = plan_students(_cfg(tmp_path, loss={"name": "hard"}))
    assert [(p.name, p.teacher, p.loss.name) for p in hard] == [
        ("student", None, "hard"), ("from-generalist", "generalist", "hinton"),
        ("from-ensemble", "ensemble", "hinton")]


def test_teacher_with_another_class_count_is_one_clear_error(tmp_path):
    cfg = _cfg(tmp_path)
    data = Dataset("blocks", [str(i) for i in range(10)], _blocks(64, 0), _blocks(32, 1), _blocks(32, 2))
    cache = TeacherCache(*compress(_random_log_probs(64, 12), 4), num_classes=12, key="other")
    plan = StudentPlan("student", "student", cfg.student.model, cfg.student.loss, "generalist")
    with pytest.raises(SpecdistillError, match="score 12 classes but the student is built for 10"):
        train_one(cfg, plan, data, cache, tmp_path / "x", torch.device("cpu"), progress=False)


@pytest.mark.parametrize("override, fragment", [
    ("student.loss.alpha=1.5", "'student.loss.alpha': Input should be less than or equal to 1"),
    ("student.loss.temperature=0", "'student.loss.temperature': Input should be greater than 0"),
    ("student.teacher=oracle", "'student.teacher'"),
    ("student.init=generalist", "student.model must be generalist.model"),
])
def test_bad_student_config_is_one_line_exit_2(override, fragment, tmp_path, capsys):
    from student.train import main

    with pytest.raises(SystemExit) as info:
        main(["--set", override, "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and fragment in err, err


def test_loss_config_checks_match_the_loss_constructors():
    # pydantic rejects these in the config; the constructors reject them for library users too
    for field, value in (("alpha", 1.5), ("temperature", 0.0)):
        with pytest.raises(ValidationError):
            StudentLossConfig(**{field: value})
        with pytest.raises(SpecdistillError):
            build_loss("hinton", **{field: value})


# ----------------------------------------------------------------------------------------------
# the stage end to end on a tiny run directory


@pytest.fixture
def tiny_run(tmp_path):
    """A run directory with a trained generalist, two specialists and a finished combine stage."""
    from generalist.train import train_generalist
    from specdistill.models import load_classifier, save_classifier
    from specialists.model import make_specialist

    cfg = _cfg(tmp_path)
    # a task hard enough that the generalist is far from perfect (about 60% on held-out data)
    data = Dataset("blocks", [f"c{i}" for i in range(10)], *(_blocks(n, seed, noise=160, signal=45)
                                                              for n, seed in ((320, 0), (160, 1), (160, 2))))
    run, paths = cfg.run_path, RunDir.of(cfg)
    train_generalist(cfg, paths.generalist, dataset=data, progress=False)
    mark_done(run, "generalist", stage_hash(cfg, "generalist"))
    generalist, meta = load_classifier(paths.generalist_weights)
    features = generalist.features(torch.as_tensor(data.train.images[:64]).float().div(127.5).sub(1)[:, None])
    for m, classes in enumerate(([0, 1, 2], [5, 6, 7, 8])):
        spec = make_specialist(generalist, classes, features.detach(), dustbin_init="lstsq")
        save_classifier(paths.specialist_weights(m), spec, {**meta, "num_classes": len(classes) + 1})
        SpecialistInfo(m, classes, [f"c{c}" for c in classes], 0.0).write(paths.specialist_info(m))
    mark_done(run, "specialists", stage_hash(cfg, "specialists"), ids=[0, 1])
    # the combine stage's measurement, made up: halfway between the generalist and perfect
    gen_acc = float(read_json(paths.generalist_meta)["metrics"]["test_acc"])
    systems = {name: {"accuracy": acc, "conditional_accuracy": None}
               for name, acc in (("generalist", gen_acc), ("kl_top1", (1 + gen_acc) / 2))}
    test = SplitEvaluation(num_examples=len(data.test), systems=systems, table4=[], conditional_examples=0,
                           active_specialists={})
    CombineResult(num_classes=10, num_specialists=2, top_n=1, solver="fixed_point", ensemble="kl_top1",
                  splits={"test": test}, specialist_ids=[0, 1]).write(paths.combine_eval)
    mark_done(run, "combine", stage_hash(cfg, "combine"))
    return tmp_path, data


def test_stage_end_to_end_with_baselines(tiny_run, capsys):
    from student.train import run_student

    tmp_path, data = tiny_run
    cfg = _cfg(tmp_path)
    result = run_student(cfg, progress=False, dataset=data)
    out = cfg.run_path / "student"
    for name in ("model.safetensors", "eval.json", "report.md", "done.json", "baselines/hard.safetensors",
                 "baselines/from-generalist.safetensors", "cache/ensemble/cache.json",
                 "cache/generalist/cache.json"):
        assert (out / name).exists(), name
    saved = read_json(out / "eval.json")
    assert set(saved["students"]) == {"student", "hard", "from-generalist"}
    gen = saved["teachers"]["generalist"]["test_acc"]
    ens = saved["teachers"]["ensemble"]["test_acc"]
    assert 0.2 < gen < 0.95 and ens == pytest.approx((1 + gen) / 2)
    for name, s in saved["students"].items():
        assert s["test_acc"] > 0.25, name                     # chance is 0.1
        assert saved["gain_kept"][name] == pytest.approx((s["test_acc"] - gen) / (ens - gen))
    # the specialists change the targets: the ensemble's cache is not the generalist's
    from student.cache import load_cache as _load

    keys = {k: read_json(out / "cache" / k / "cache.json")["key"] for k in ("ensemble", "generalist")}
    ens_q = _load(out / "cache" / "ensemble", keys["ensemble"]).lookup(torch.arange(100))
    gen_q = _load(out / "cache" / "generalist", keys["generalist"]).lookup(torch.arange(100))
    assert (ens_q - gen_q).abs().max() > 1e-2
    assert result["test_acc"] == saved["students"]["student"]["test_acc"]
    assert "gain kept" in (out / "report.md").read_text()
    # done: a second call is skipped (nothing is retrained)
    before = (out / "model.safetensors").stat().st_mtime_ns
    run_student(cfg, progress=False, dataset=data)
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert "already trained" in capsys.readouterr().out
    # another config reruns, reusing the keyed ensemble cache but not a stale one
    cfg2 = _cfg(tmp_path, baselines=False, cache_top_k=3)
    run_student(cfg2, progress=False, dataset=data)
    assert read_json(out / "cache" / "ensemble" / "cache.json")["top_k"] == 3
    assert set(read_json(out / "eval.json")["students"]) == {"student"}
    # adding a baseline keeps the main student (same model, loss, schedule and teacher): not retrained
    run_folder = max((d for d in (out / "runs").iterdir() if d.name.startswith("student-")),
                     key=lambda d: (d / "metrics.jsonl").stat().st_mtime_ns)   # cfg2's student
    log_before = (run_folder / "metrics.jsonl").read_text()
    run_student(_cfg(tmp_path, baselines=["hard"], cache_top_k=3), progress=False, dataset=data)
    assert (run_folder / "metrics.jsonl").read_text() == log_before
    assert set(read_json(out / "eval.json")["students"]) == {"student", "hard"}


def test_stage_with_generalists_teacher_and_assistant(tiny_run):
    from student.train import run_student

    tmp_path, data = tiny_run
    cfg = _cfg(tmp_path, teacher="generalists", teacher_seeds=[0, 1], baselines=False,
               assistant={"name": "mlp", "hidden": [48]})
    result = run_student(cfg, progress=False, dataset=data)
    run = cfg.run_path
    assert (run / "generalist-seed1" / "model.safetensors").exists()
    assert (run / "generalist-seed1" / "done.json").exists()
    assert set(result["students"]) == {"assistant", "student"}
    assert result["students"]["student"]["teacher"] == "assistant"
    assert result["teachers"]["generalists"]["seeds"] == [0, 1]
    assert result["teachers"]["generalists"]["test_acc"] > 0.25
    assert (run / "student" / "cache" / "assistant" / "cache.json").exists()
    assert result["students"]["student"]["test_acc"] > 0.25


def test_teacher_on_the_augmented_view_runs_the_ensemble_on_every_batch(tiny_run, monkeypatch):
    """student.teacher_view=augmented: the live ensemble equals the cached teacher on clean images, the
    students see it on their own augmented batches (no cache is built), and it keys its own runs."""
    from specdistill.data.loading import to_float
    from student import teachers as teachers_module
    from student.teachers import LiveEnsemble, ensemble_teacher, live_teacher
    from student.train import run_student

    tmp_path, data = tiny_run
    cfg = _cfg(tmp_path, teacher="ensemble", teacher_view="augmented", baselines=["from-generalist"])
    live = live_teacher(cfg, "ensemble", data, torch.device("cpu"))
    clean = data.train.images[:50]
    cached = ensemble_teacher(cfg, data, torch.device("cpu"))(clean)
    torch.testing.assert_close(live(to_float(torch.as_tensor(clean))), cached, atol=1e-5, rtol=1e-5)
    seen = {"ensemble": [], "generalist": []}
    for name, cls in (("ensemble", LiveEnsemble), ("generalist", teachers_module.LogProbsOf)):
        def spy(self, images, real=cls.forward, name=name):
            seen[name].append(images.clone())
            return real(self, images)

        monkeypatch.setattr(cls, "forward", spy)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"augment": True})})
    for stage in ("generalist", "specialists", "combine"):   # the same models, now trained "with" augmentation
        mark_done(cfg.run_path, stage, stage_hash(cfg, stage), **({"ids": [0, 1]} if stage == "specialists" else {}))
    result = run_student(cfg, progress=False, dataset=data)
    run = cfg.run_path
    assert not any((run / "student" / "cache" / kind).exists() for kind in ("ensemble", "generalist"))
    batches = cfg.student.train.epochs * -(-len(data.train) // cfg.student.train.batch_size)
    assert len(seen["ensemble"]) == len(seen["generalist"]) == batches   # a teacher pass per training step
    raw = to_float(torch.as_tensor(data.train.images))[:, 0]
    for batch in seen["ensemble"][:3]:                 # augmented views, not the clean images
        assert not any(torch.equal(image[0], r) for image in batch[:4] for r in raw)
    assert "run on every augmented batch" in result["augmentation"]
    assert set(result["students"]) == {"student", "from-generalist"} and result["test_acc"] > 0.25
    with pytest.raises(SpecdistillError, match="teacher_view=cached"):
        live_teacher(cfg, "generalists", data, torch.device("cpu"))


def test_mixup_shows_the_live_ensemble_mixed_images_and_keys_its_own_runs(tiny_run, monkeypatch):
    """student.mixup with the teacher on the student's view: on un-augmented data the ensemble scores mixes
    of two training images (not the clean ones), the report says so, and the runs are keyed apart."""
    from student.teachers import LiveEnsemble
    from student.train import run_student

    tmp_path, data = tiny_run
    cfg = _cfg(tmp_path, teacher="ensemble", teacher_view="augmented", baselines=["hard"], mixup=1.0)
    seen = []

    def spy(self, images, real=LiveEnsemble.forward):
        seen.append(images.clone())
        return real(self, images)

    monkeypatch.setattr(LiveEnsemble, "forward", spy)
    result = run_student(cfg, progress=False, dataset=data)
    raw = to_float(torch.as_tensor(data.train.images)).flatten(1)
    first = seen[0].flatten(1)
    clean = (torch.cdist(first, raw) < 1e-4).any(1)
    assert clean.float().mean() < 0.2      # most rows are mixes (a row mixed with weight ~1 may look clean)
    assert "mixed up in pairs (student.mixup=1" in result["augmentation"]
    consulted = result["students"]["student"]["teacher_consulted"]   # counted over every view it scored
    assert consulted["views"] == sum(len(b) for b in seen)
    assert 0 < consulted["share_consulting"] <= 1 and consulted["specialists_per_view"] >= consulted["share_consulting"]
    assert "the ensemble consulted a specialist on" in (cfg.run_path / "student" / "report.md").read_text()
    assert "teacher_consulted" not in result["students"]["hard"]
    # paired on the same examples: the counts differ exactly as the accuracies do
    generalist_metrics = read_json(RunDir.of(cfg).generalist_meta)["metrics"]
    for split, n in (("val", len(data.val)), ("test", len(data.test))):
        student = result["students"]["student"][f"{split}_acc"]
        for rival, acc in (("hard", result["students"]["hard"][f"{split}_acc"]),
                           ("generalist", generalist_metrics[f"{split}_acc"])):
            c = result["paired"][rival][split]
            assert c["only_student"] - c["only_rival"] == round((student - acc) * n)
            assert 0 <= c["p_value"] <= 1
    report = (cfg.run_path / "student" / "report.md").read_text()
    assert "only the rival" in report and "## Teacher cache" not in report   # no cache: every teacher ran live
    assert set(result["students"]) == {"student", "hard"} and result["test_acc"] > 0.25
    plan = plan_students(cfg)[0]
    plain = cfg.model_copy(update={"student": cfg.student.model_copy(update={"mixup": 0.0})})
    assert _run_folder(plan, "k", cfg, "d") != _run_folder(plan, "k", plain, "d")
    assert stage_hash(cfg, "student") != stage_hash(plain, "student")


def test_paired_counts_and_sign_test_by_hand():
    from student.report import paired

    student = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 1], bool)
    rival = np.array([1, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    c = paired(student, rival)
    assert (c["only_student"], c["only_rival"]) == (6, 1)
    assert c["p_value"] == pytest.approx(16 / 128)   # two-sided: P(X <= 1) + P(X >= 6) for X ~ Bin(7, 1/2)
    assert paired(student, student) == {"only_student": 0, "only_rival": 0, "p_value": 1.0}


def test_a_student_started_from_the_generalist_begins_with_its_weights(tiny_run, monkeypatch):
    """student.init=generalist: the student and its baselines start training from the generalist's weights
    (the scratch student does not), record it, and keep their checkpoints apart from scratch runs."""
    import student.train as student_train
    from specdistill.models import load_classifier

    tmp_path, data = tiny_run
    same_net = {"name": "mlp", "hidden": [64]}
    generalist, _ = load_classifier(RunDir.of(_cfg(tmp_path)).generalist_weights)
    starts: dict[str, bool] = {}
    real_fit = student_train.fit

    def spy(model, *args, desc, **kwargs):
        starts[desc] = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                generalist.state_dict().values()))
        return real_fit(model, *args, desc=desc, **kwargs)

    monkeypatch.setattr(student_train, "fit", spy)
    folders = {}
    for init in ("scratch", "generalist"):
        cfg = _cfg(tmp_path, model=same_net, init=init, baselines=["hard"], train={"epochs": 1, "batch_size": 32})
        result = student_train.run_student(cfg, progress=False, dataset=data)
        assert starts == {"student": init == "generalist", "hard": init == "generalist"}, init
        assert {s["init"] for s in result["students"].values()} == {init}
        assert init in (cfg.run_path / "student" / "report.md").read_text()
        folders[init] = {p.name for p in (cfg.run_path / "student" / "runs").iterdir()}
        starts.clear()
    assert len(folders["generalist"] - folders["scratch"]) == 2    # both students got new checkpoints


def test_a_wider_student_started_from_the_generalist_begins_with_its_predictions(tiny_run, monkeypatch):
    """student.init=generalist with a wider student.model: the generalist's weights are widened into it
    (models.widen_from), so training starts from the generalist's predictions on held-out images; the
    recorded compute is the wider net's, and a narrower student is refused when the config is read."""
    import student.train as student_train
    from specdistill.models import load_classifier

    tmp_path, data = tiny_run
    generalist, _ = load_classifier(RunDir.of(_cfg(tmp_path)).generalist_weights)
    images = to_float(torch.as_tensor(data.val.images[:64]))
    starts: dict[str, float] = {}
    real_fit = student_train.fit

    def spy(model, *args, desc, **kwargs):
        with torch.no_grad():
            starts[desc] = (model.eval()(images) - generalist(images)).abs().max().item()
        return real_fit(model, *args, desc=desc, **kwargs)

    monkeypatch.setattr(student_train, "fit", spy)
    cfg = _cfg(tmp_path, model={"name": "mlp", "hidden": [96]}, init="generalist", baselines=["hard"],
               train={"epochs": 1, "batch_size": 32})
    result = student_train.run_student(cfg, progress=False, dataset=data)
    assert set(starts) == {"student", "hard"} and max(starts.values()) < 1e-5, starts
    assert result["students"]["student"]["macs"] > 1.4 * count_flops(generalist, data.channels, data.image_size)
    with pytest.raises(SpecdistillError, match="or the same network made wider"):
        _cfg(tmp_path, model={"name": "mlp", "hidden": [32]}, init="generalist")


def test_specdistill_student_command_reports_a_missing_upstream_stage(tmp_path, capsys):
    from specdistill.cli import main

    with pytest.raises(SystemExit) as info:
        main(["student", "--run-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "stage 'generalist' has not finished" in err and err.count("\n") == 1


def test_load_config_accepts_student_sections():
    cfg = load_config(None, ["student.loss.name=noisy_teacher", "student.loss.noise_fraction=0.5",
                             "student.teacher=generalists", "student.assistant.name=mlp"])
    assert cfg.student.loss.noise_fraction == 0.5 and cfg.student.assistant.name == "mlp"


def test_a_combine_result_that_is_not_one_stops_before_training(tiny_run):
    """The report reads the ensemble's measured accuracy; it never rebuilds the ensemble to guess it."""
    from student.train import run_student

    tmp_path, data = tiny_run
    cfg = _cfg(tmp_path, baselines=False)
    (cfg.run_path / "combine" / "eval.json").write_text("{}")
    with pytest.raises(SpecdistillError, match=r"eval.json is not a combine result.*--from combine"):
        run_student(cfg, progress=False, dataset=data)
    assert not (cfg.run_path / "student" / "runs").exists()    # nothing trained


def test_the_tail_keeps_its_tempered_mass_when_few_of_many_classes_hold_it():
    """A tail held by 3 of 99 classes must not be tempered as if it were spread over all 99: the
    tempered targets the loss reads (lookup at T, then / T) put on the tail what the teacher's own
    tempered distribution puts there, not the far larger share of an even split."""
    from student.cache import tempered_tail_share

    q = torch.full((2, 100), 1e-20)
    q[:, 0], q[:, 1:4] = 0.7, 0.1
    log_q = torch.log(q / q.sum(1, keepdim=True))
    cache = TeacherCache(*compress(log_q, 1), num_classes=100, key="k")
    assert cache.tail_classes[0] == pytest.approx(3.0, rel=1e-3)
    for temperature in (1.0, 2.0, 4.0):
        truth = torch.softmax(log_q / temperature, dim=1)[:, 1:].sum(1).mean()
        assert tempered_tail_share(cache, temperature) == pytest.approx(float(truth), abs=2e-3)
        tempered = torch.softmax(cache.lookup(torch.arange(2), temperature) / temperature, dim=1)
        assert tempered[0, 0] == pytest.approx(float(torch.softmax(log_q[0] / temperature, 0)[0]), abs=2e-3)
    even_split = (99 * (0.3 / 99) ** 0.5) / (0.7 ** 0.5 + 99 * (0.3 / 99) ** 0.5)   # what it was before
    assert tempered_tail_share(cache, 2.0) < even_split - 0.3


def test_tempered_tail_share_by_hand():
    from student.cache import tempered_tail_share

    # 4 classes, top 1 kept: p = 0.7 on the top class, 0.3 spread evenly over the other three
    log_probs = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]]))
    cache = TeacherCache(*compress(log_probs, 1), num_classes=4, key="k")
    assert tempered_tail_share(cache, 1.0) == pytest.approx(0.3, abs=1e-3)
    share_t2 = 3 * 0.1 ** 0.5 / (0.7 ** 0.5 + 3 * 0.1 ** 0.5)
    assert tempered_tail_share(cache, 2.0) == pytest.approx(share_t2, abs=1e-3)
    assert tempered_tail_share(cache, 100.0) > 0.74          # T -> infinity: uniform, 3/4 outside
    full = TeacherCache(*compress(log_probs, 4), num_classes=4, key="k")
    assert tempered_tail_share(full, 4.0) == 0.0
