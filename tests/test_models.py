import pytest
import torch

from specdistill.config import ModelConfig
from specdistill.errors import SpecdistillError
from specdistill.models import MODELS, build_model, count_flops, load_classifier, save_classifier, widen_from


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


@pytest.mark.parametrize("small_cfg, big_cfg", [
    (ModelConfig(depth=8, width=4), ModelConfig(depth=8, width=6)),
    (ModelConfig(name="mlp", hidden=[24, 16]), ModelConfig(name="mlp", hidden=[40, 32])),
])
def test_a_wider_network_starts_as_the_narrow_one_and_learns_with_its_new_channels(small_cfg, big_cfg):
    """widen_from: the wider net computes the narrow one's function exactly (train-mode batch statistics
    included), is not just the narrow one padded with dead units (one step moves the head's new columns),
    and is a different function once trained."""
    assert big_cfg.grows_from(small_cfg) and not small_cfg.grows_from(big_cfg)
    torch.manual_seed(0)
    small, big = build_model(small_cfg, 9, 1, 12), build_model(big_cfg, 9, 1, 12)
    x, y = torch.randn(32, 1, 12, 12), torch.randint(0, 9, (32,))
    with torch.no_grad():       # running statistics away from their initial values
        small.train()(x * 2 + 1)
    widen_from(big, small.state_dict())
    for mode in ("eval", "train"):
        getattr(small, mode)(), getattr(big, mode)()
        assert torch.allclose(big(x), small(x), atol=1e-6), mode
    old = small.head.in_features
    assert big.head.in_features > old and not big.head.weight[:, old:].any()
    torch.nn.functional.cross_entropy(big.train()(x), y).backward()
    assert big.head.weight.grad[:, old:].abs().sum() > 0
    with torch.no_grad():
        big.head.weight[:, old:] += 0.5
    assert not torch.allclose(big.eval()(x), small.eval()(x), atol=1e-3)


def test_widening_refuses_another_network_in_one_line():
    small = build_model(ModelConfig(depth=8, width=8), 5, 1, 16)
    with pytest.raises(SpecdistillError, match="differ in their layers"):
        widen_from(build_model(ModelConfig(depth=14, width=8), 5, 1, 16), small.state_dict())
    with pytest.raises(SpecdistillError, match="does not fit in the student's"):
        widen_from(build_model(ModelConfig(depth=8, width=4), 5, 1, 16), small.state_dict())
    assert not ModelConfig(depth=14, width=16).grows_from(ModelConfig(depth=8, width=8))
    assert not ModelConfig(name="resnet18", width=32).grows_from(ModelConfig(name="resnet18", width=16))
