"""Model registry: every model is a :class:`Classifier` = ``backbone`` (images -> features) + ``head``.

Keeping the head in one named place lets the specialist stage swap it for a group+dustbin head and
the student stage pick any architecture by name. CIFAR-style ResNets (He et al. 2016, section 4.2)
suit the small rendered inputs; torchvision's and timm's models (``torchvision:<arch>``,
``timm:<arch>``, or a user's ``python:<module>:<function>``: ``specdistill/model_zoo.py``) suit
``imagefolder`` data; an MLP reproduces the paper's MNIST-style experiments.

Every stage feeds a model ``to_float``'s images (``x/127.5 - 1``, in [-1, 1]). A model whose weights
expect another normalisation (ImageNet's mean and std) carries it: ``model.mean`` / ``model.std`` in
the config, recorded with the architecture in the run directory, applied first in ``features``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from specdistill.artifacts import load_weights, save_weights
from specdistill.config import ModelConfig
from specdistill.errors import SpecdistillError
from specdistill.model_zoo import build_library_model, detach_head, is_library_name
from specdistill.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


class Classifier(nn.Module):
    """``forward(x) = head(backbone(x))``; ``backbone`` ends in a flat feature vector."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features = num_features
        self.head = nn.Linear(num_features, num_classes)
        self.register_buffer("input_scale", None, persistent=False)
        self.register_buffer("input_shift", None, persistent=False)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def set_input_normalization(self, mean: list[float] | None, std: list[float] | None) -> None:
        """Map ``to_float``'s [-1, 1] input to ``(x01 - mean) / std`` (None: keep [-1, 1]).

        Buffers, not parameters, and not saved with the weights: the config recorded beside the
        weights rebuilds them, so weights trained before this existed load unchanged.
        """
        if mean is None or std is None:
            self.input_scale = self.input_shift = None
            return
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("input_scale", 0.5 / s, persistent=False)
        self.register_buffer("input_shift", (0.5 - m) / s, persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale + self.input_shift
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------
# CIFAR-style ResNet: 3 stages of n basic blocks, widths w, 2w, 4w; depth = 6n + 2.


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


@MODELS.register("resnet_cifar")
def resnet_cifar(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    if (cfg.depth - 2) % 6:
        raise SpecdistillError(f"model.depth={cfg.depth}: resnet_cifar needs depth = 6n+2 (8, 14, 20, 32, 44, 56)")
    n, w = (cfg.depth - 2) // 6, cfg.width
    layers: list[nn.Module] = [nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
    cin = w
    for stage, cout in enumerate((w, 2 * w, 4 * w)):
        for block in range(n):
            layers.append(_BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if cfg.dropout:
        layers.append(nn.Dropout(cfg.dropout))
    model = Classifier(nn.Sequential(*layers), cin, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


@MODELS.register("mlp")
def mlp(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    """The paper's MNIST nets: fully connected ReLU layers, optional dropout (section 3)."""
    layers: list[nn.Module] = [nn.Flatten()]
    cin = in_channels * image_size * image_size
    for width in cfg.hidden:
        layers += [nn.Linear(cin, width), nn.ReLU()]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        cin = width
    return Classifier(nn.Sequential(*layers), cin, num_classes)


def library_classifier(name: str, num_classes: int, in_channels: int, pretrained: bool = False) -> Classifier:
    """A torchvision / timm / ``python:`` model as a Classifier: its last Linear becomes the head.

    With ``pretrained`` the library's weights are loaded first; a head of another size is then
    replaced by a fresh one (fine-tuning from the library's features).
    """
    net = build_library_model(name, num_classes, pretrained)
    net, linear = detach_head(net)
    if in_channels != 3:
        net = nn.Sequential(_RepeatChannels(3), net)
    model = Classifier(net, linear.in_features, num_classes)
    if linear.out_features == num_classes:
        model.head = linear
    return model


def _torchvision_model(name: str) -> Callable[..., Classifier]:
    def build(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> Classifier:
        return library_classifier(f"torchvision:{name}", num_classes, in_channels, cfg.pretrained)

    return build


class _RepeatChannels(nn.Module):
    """Grey images into ImageNet models: repeat the channel instead of changing the stem."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, -1, -1)


for _name in ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
              "efficientnet_b0", "convnext_tiny", "vit_b_16", "regnet_y_400mf"):
    MODELS.register(_name)(_torchvision_model(_name))


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    """Build a model with a ``num_classes`` head for ``in_channels`` x ``image_size`` input: a registered
    name, or ``torchvision:`` / ``timm:`` / ``python:`` (``specdistill/model_zoo.py``)."""
    if is_library_name(cfg.name):
        model = library_classifier(cfg.name, num_classes, in_channels, cfg.pretrained)
    else:
        model = MODELS.get(cfg.name)(cfg, num_classes, in_channels, image_size)
    if (cfg.mean is None) != (cfg.std is None):
        raise SpecdistillError("model.mean and model.std go together; set both (e.g. ImageNet's "
                               "[0.485, 0.456, 0.406] and [0.229, 0.224, 0.225]) or neither")
    for key, values in (("mean", cfg.mean), ("std", cfg.std)):
        if values is not None and len(values) not in (1, in_channels, 3):
            raise SpecdistillError(f"model.{key} has {len(values)} values; give one per input channel "
                                   f"({in_channels}) or 3 for an RGB model")
    model.set_input_normalization(cfg.mean, cfg.std)
    return model


def count_flops(model: nn.Module, in_channels: int, image_size: int) -> int:
    """Multiply-accumulates of one forward pass (for 'a quarter of the generalist's compute')."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    x = torch.zeros(1, in_channels, image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops() // 2)


def widen_from(model: Classifier, state: dict[str, torch.Tensor]) -> Classifier:
    """Load a narrower network of the same family into ``model`` so it computes the same function.

    Every tensor of ``state`` fills the leading corner of ``model``'s tensor of the same name; the extra
    channels keep ``model``'s fresh initialisation, except that the weights from a new input channel into
    an old output (and into the head) are zero, so the old channels never see the new ones until training
    moves those weights. Batch-norm channels beyond the old ones keep their identity statistics. This is
    Net2Net's function-preserving widening (Chen et al. 2016) with zeros where Net2Net copies units: a
    wider student starts at the generalist's accuracy and learns what the extra channels can add.
    """
    target = model.state_dict()
    if set(target) != set(state):
        raise SpecdistillError("the generalist's network and the student's differ in their layers, not only in "
                               "width; give student.model the generalist's name and depth")
    grown: dict[str, torch.Tensor] = {}
    for key, small in state.items():
        big = target[key].clone()
        if small.shape == big.shape:
            grown[key] = small.clone()
            continue
        fits = small.dim() == big.dim() and small.shape[2:] == big.shape[2:]
        if not fits or any(s > b for s, b in zip(small.shape, big.shape)):
            raise SpecdistillError(f"{key}: the generalist's {tuple(small.shape)} does not fit in the student's "
                                   f"{tuple(big.shape)}; the student must be the generalist's network or a wider one")
        if small.dim() >= 2:        # [out, in, ...]: old outputs ignore the new inputs
            big[: small.shape[0], small.shape[1]:] = 0
        big[tuple(slice(0, n) for n in small.shape)] = small
        grown[key] = big
    model.load_state_dict(grown)
    return model


def save_classifier(path: str | os.PathLike, model: Classifier, meta: dict[str, Any]) -> None:
    """Weights as safetensors; ``meta`` must hold what :func:`load_classifier` needs to rebuild
    the architecture: ``model`` (a ModelConfig dump), ``num_classes``, ``channels``, ``image_size``."""
    for key in ("model", "num_classes", "channels", "image_size"):
        if key not in meta:
            raise ValueError(f"save_classifier: meta lacks {key!r}")
    save_weights(path, model.state_dict(), meta)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Rebuild a classifier from a file written by :func:`save_classifier`; eval mode."""
    tensors, meta = load_weights(path)
    try:
        # the saved weights replace the library's, so the library's are never fetched again
        cfg = ModelConfig(**{**meta["model"], "pretrained": False})
        model = build_model(cfg, meta["num_classes"], meta["channels"], meta["image_size"])
        model.load_state_dict(tensors)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise SpecdistillError(
            f"{path} does not match its recorded architecture ({str(exc).splitlines()[0]}); "
            "delete it and retrain the stage"
        ) from None
    return model.to(device).eval(), meta
