import pytest
import torch

from specdistill.config import ModelConfig
from specdistill.errors import SpecdistillError
from specdistill.models import MODELS, build_model, count_flops, load_classifier, save_classifier


@pytest.mark.parametrize("name, channels, size", [
    ("resnet_cifar", 1, 32), ("resnet_cifar", 3, 24), ("mlp", 1, 28), ("resnet18", 1, 32),
    ("mobilenet_v3_small", 3, 32), ("efficientnet_b0", 3, 32),
])
def test_registry_builds_classifiers_with_a_named_head(name, channels, size):
    model = build_model(ModelConfig(name=name, depth=8, width=8, hidden=[32]), 7, channels, size)
    out = model.eval()(torch.zeros(2, channels, size, size))
    assert out.shape == (2, 7)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 7
    assert model.features(torch.zeros(2, channels, size, size)).shape == (2, model.num_features)
    # replacing the head is how specialists get their group + dustbin output
    model.head = torch.nn.Linear(model.num_features, 4)
    assert model(torch.zeros(1, channels, size, size)).shape == (1, 4)


def test_depth_and_width_change_the_resnet():
    small = build_model(ModelConfig(depth=8, width=8), 10, 1, 32)
    big = build_model(ModelConfig(depth=20, width=16), 10, 1, 32)
    assert count_flops(big, 1, 32) > 4 * count_flops(small, 1, 32)
    assert "resnet_cifar" in MODELS.names()


def test_unknown_model_and_bad_depth():
    with pytest.raises(SpecdistillError, match="unknown model 'resnet_huge'; choose one of"):
        build_model(ModelConfig(name="resnet_huge"), 10, 1, 32)
    with pytest.raises(SpecdistillError, match="6n\\+2"):
        build_model(ModelConfig(depth=10), 10, 1, 32)


def test_save_load_round_trip_and_truncated_file(tmp_path):
    cfg = ModelConfig(depth=8, width=8)
    model = build_model(cfg, 5, 1, 16).eval()
    meta = {"model": cfg.model_dump(), "num_classes": 5, "channels": 1, "image_size": 16, "note": "x"}
    save_classifier(tmp_path / "m.safetensors", model, meta)
    loaded, got = load_classifier(tmp_path / "m.safetensors")
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(model(x), loaded(x)) and got["note"] == "x"
    blob = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SpecdistillError, match="corrupt or truncated"):
        load_classifier(tmp_path / "bad.safetensors")
    with pytest.raises(SpecdistillError, match="missing weights"):
        load_classifier(tmp_path / "none.safetensors")
