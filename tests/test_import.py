"""Bring your own generalist (issue 13, part 1-2): a torchvision, timm or hand-written model saved as
a user would, imported, gives exactly the source model's predictions; bad weights stop with one line.

Everything is made here: a small class-folder tree (JPEG and PNG, mixed sizes, RGB and grey) and
models with random weights; nothing is downloaded.
"""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch import nn

from specdistill.artifacts import read_json
from specdistill.config import load_config
from specdistill.data import load_data
from specdistill.data.loading import to_float
from specdistill.models import load_classifier
from specdistill.rundir import RunDir
from testkit.cli import one_line_error, run_cli

CLASSES = ["n01440764", "n01443537", "n01484850", "n01491361"]   # ImageNet-1k ids: tench, goldfish, ...
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def write_tree(root: Path, per_class: int = 8) -> Path:
    """root/<class>/*: JPEG and PNG, sizes from 30 to 70 px, every third image greyscale."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(30, 70, 2)
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            pixels[:, :, c % 3] = np.clip(pixels[:, :, c % 3].astype(int) + 60 * c, 0, 255)
            image = Image.fromarray(pixels)
            if i % 3 == 0:
                image = image.convert("L")
            image.save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("folder") / "images")


def config(tmp: Path, tree: Path, model: str, weights: Path | None, **extra: str) -> Path:
    weights_line = f"\n  weights: {weights}" if weights else ""
    text = f"""name: imported
data: {{source: imagefolder, root: {tree}, image_size: 32, val_fraction: 0.25, cache_dir: {tmp / 'cache'}}}
generalist:
  model: {{name: "{model}"}}{weights_line}
  train: {{eval_batch_size: 16}}
clustering: {{k: 2, min_size: 2}}
specialists:
  train: {{epochs: 1, batch_size: 8}}
  ray_address: local
student:
  model: {{name: resnet_cifar, depth: 8, width: 4}}
  train: {{epochs: 1, batch_size: 8}}
  baselines: false
"""
    path = tmp / "imported.yaml"
    path.write_text(text)
    return path


def source_log_probs(net: nn.Module, images: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """The source model on images normalised the usual way: (x/255 - mean) / std."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.log_softmax(net.eval()(x), 1).numpy()


def imported(tmp: Path, tree: Path, model: str, weights: Path | None, *args: str):
    cfg_path = config(tmp, tree, model, weights)
    run = tmp / "run"
    proc = run_cli("specdistill.cli", "import", "--config", str(cfg_path), "--run-dir", str(run), *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = load_config(cfg_path, [f"run_dir={run}"])
    return RunDir.at(run), load_data(cfg.data, cfg.seed), proc.stdout


def test_torchvision_state_dict_gives_the_source_models_predictions(tmp_path, tree):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=len(CLASSES)).eval()
    weights = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights)
    run, data, out = imported(tmp_path, tree, "torchvision:resnet18", weights)
    assert "imported torchvision:resnet18" in out
    for split in ("val", "test"):
        stored = np.load(RunDir.preds_in(run.generalist, split))
        expected = source_log_probs(source, data.split(split).images)
        assert np.abs(stored - expected).max() < 1e-4
        assert (stored.argmax(1) == expected.argmax(1)).all()
    meta = read_json(run.generalist_meta)
    assert meta["model"]["mean"] == IMAGENET_MEAN and meta["model"]["std"] == IMAGENET_STD
    assert meta["imported"]["sha256"] and meta["class_names"] == CLASSES
    # the stored generalist rebuilds with its normalisation, as every later stage loads it
    model, _ = load_classifier(run.generalist_weights)
    x = torch.as_tensor(np.asarray(data.val.images[:5]))
    with torch.no_grad():
        again = torch.log_softmax(model(to_float(x)), 1).numpy()
    assert np.abs(again - np.load(RunDir.preds_in(run.generalist, "val"))[:5]).max() < 1e-5


def test_timm_checkpoint_dict_from_ddp_training(tmp_path, tree):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=len(CLASSES)).eval()
    mean, std = source.pretrained_cfg["mean"], source.pretrained_cfg["std"]
    weights = tmp_path / "checkpoint.pth.tar"   # as timm's train.py saves one: under state_dict, DDP-prefixed
    torch.save({"epoch": 7, "arch": "test_resnet",
                "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, weights)
    run, data, _ = imported(tmp_path, tree, "timm:test_resnet", weights)
    stored = np.load(RunDir.preds_in(run.generalist, "test"))
    assert np.abs(stored - source_log_probs(source, data.test.images, mean, std)).max() < 1e-4
    assert read_json(run.generalist_meta)["imported"]["architecture"] == "test_resnet"


def test_python_entry_point_and_safetensors(tmp_path, tree, monkeypatch):
    from safetensors.torch import save_file

    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mynets.py").write_text(
        "from torch import nn\n"
        "def build(num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(8, num_classes))\n")
    monkeypatch.syspath_prepend(str(package))
    sys.modules.pop("mynets", None)
    import mynets

    torch.manual_seed(2)
    source = mynets.build(len(CLASSES))
    weights = tmp_path / "mine.safetensors"
    save_file(source.state_dict(), str(weights))
    run, data, _ = imported(tmp_path, tree, "python:mynets:build", weights, "--set",
                            "generalist.model.mean=[0.5,0.5,0.5]", "--set", "generalist.model.std=[0.25,0.25,0.25]")
    stored = np.load(RunDir.preds_in(run.generalist, "val"))
    assert np.abs(stored - source_log_probs(source, data.val.images, [0.5] * 3, [0.25] * 3)).max() < 1e-4


def test_imagenet_head_keeps_the_rows_of_the_class_folders(tmp_path, tree):
    torch.manual_seed(3)
    source = torchvision.models.resnet18(num_classes=1000).eval()
    weights = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), weights)
    run, data, _ = imported(tmp_path, tree, "torchvision:resnet18", weights)
    rows = [0, 1, 2, 3]   # the four WordNet ids are ImageNet-1k's first four classes
    x = torch.as_tensor(np.asarray(data.test.images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.log_softmax(source(x)[:, rows], 1).numpy()
    assert np.abs(np.load(RunDir.preds_in(run.generalist, "test")) - expected).max() < 1e-4
    assert "ImageNet-1k rows" in read_json(run.generalist_meta)["imported"]["head_rows"]


def _import_error(tmp_path: Path, tree: Path, model: str, weights: Path | None, *args: str) -> str:
    cfg_path = config(tmp_path, tree, model, weights)
    run = tmp_path / "run"
    line = one_line_error(run_cli("specdistill.cli", "import", "--config", str(cfg_path), "--run-dir", str(run),
                                  *args))
    assert not (run / "generalist" / "done.json").exists() and not (run / "generalist" / "model.safetensors").exists()
    return line


def test_bad_weights_stop_with_one_line(tmp_path, tree):
    net = torchvision.models.resnet18(num_classes=len(CLASSES))
    whole = tmp_path / "whole.pt"
    torch.save(net, whole)
    assert "pickled Python object" in _import_error(tmp_path, tree, "torchvision:resnet18", whole)
    assert "torch.save(model.state_dict(), path)" in _import_error(tmp_path, tree, "torchvision:resnet18", whole)
    state = tmp_path / "state.pth"
    torch.save(net.state_dict(), state)
    line = _import_error(tmp_path, tree, "torchvision:resnet34", state)
    assert "not a torchvision:resnet34 state dict" in line and "generalist.model.name" in line
    ten = tmp_path / "ten.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), ten)
    line = _import_error(tmp_path, tree, "torchvision:resnet18", ten)
    assert "has 10 classes but the data has 4" in line
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(state.read_bytes()[:5000])
    assert "corrupt" in _import_error(tmp_path, tree, "torchvision:resnet18", corrupt)
    assert "timm has no model 'resnet_nope'" in _import_error(tmp_path, tree, "timm:resnet_nope", state)
    assert "does not exist" in _import_error(tmp_path, tree, "torchvision:resnet18", tmp_path / "missing.pth")


def test_pretrained_offline_names_the_cache_to_fill(tmp_path, tree, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    line = _import_error(tmp_path, tree, "torchvision:resnet18", None, "--pretrained")
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in line


def test_timm_pretrained_offline_names_the_hugging_face_cache(tmp_path, tree, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    cfg_path = config(tmp_path, tree, "timm:resnet18", None)
    line = one_line_error(run_cli("specdistill.cli", "import", "--config", str(cfg_path), "--run-dir",
                                  str(tmp_path / "run"), "--pretrained"))
    assert "not cached" in line and str(tmp_path / "hf-cache") in line
    unknown = one_line_error(run_cli("specdistill.cli", "import", "--config", str(cfg_path), "--run-dir",
                                     str(tmp_path / "run"), "--model", "torchvision:resnet_nope", "--pretrained"))
    assert "torchvision has no classification model 'resnet_nope'" in unknown


def test_whole_pipeline_from_an_imported_generalist(tmp_path, tree):
    torch.manual_seed(4)
    source = torchvision.models.resnet18(num_classes=len(CLASSES)).eval()
    weights = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights)
    cfg_path = config(tmp_path, tree, "torchvision:resnet18", weights)
    run = tmp_path / "run"
    proc = run_cli("specdistill.cli", "run", str(cfg_path), "--run-dir", str(run))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("generalist", "clustering", "specialists", "combine", "student"):
        assert (run / stage / "done.json").exists()
    # the specialists start from the imported backbone and keep its normalisation
    specialist, meta = load_classifier(next((run / "specialists").glob("*.safetensors")))
    assert meta["model"]["mean"] == IMAGENET_MEAN and specialist.input_scale is not None
    assert read_json(run / "combine" / "eval.json")
    assert "imported from" in (run / "report.md").read_text()
    # a rerun finds the import done; a changed weights file is imported again
    again = run_cli("generalist.importing", "--config", str(cfg_path), "--run-dir", str(run))
    assert again.returncode == 0 and "already imported" in again.stdout
    torch.save(torchvision.models.resnet18(num_classes=len(CLASSES)).state_dict(), weights)
    changed = run_cli("generalist.importing", "--config", str(cfg_path), "--run-dir", str(run))
    assert changed.returncode == 0 and "changed since it was imported" in changed.stdout
