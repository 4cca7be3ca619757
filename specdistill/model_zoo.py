"""Architectures from torchvision, timm or a user's own code, as a :class:`~specdistill.models.Classifier`.

A model name in a config picks the library by prefix:

- ``torchvision:<arch>`` (e.g. ``torchvision:resnet50``): ``torchvision.models.get_model``;
- ``timm:<arch>`` (e.g. ``timm:convnext_tiny``): ``timm.create_model``;
- ``python:<module>:<function>``: any architecture no library has; ``function`` returns an
  ``nn.Module`` (it is called with ``num_classes=`` when it takes that argument). The module must be
  importable wherever a stage runs (on every Ray node too).

The library's model keeps its own head; :func:`as_classifier` finds the last ``nn.Linear`` that maps
features to classes and moves it to ``Classifier.head``, so the specialist stage can swap it and the
model's parameters keep the library's names under ``backbone.``. ``pretrained: true`` uses the
library's own weights where the machine has them (downloaded or cached), otherwise one line names
the cache path to fill.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from specdistill.errors import SpecdistillError

PREFIXES = ("torchvision:", "timm:", "python:")
# the normalisation of ImageNet-trained weights (torchvision's and most of timm's)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_library_name(name: str) -> bool:
    return name.startswith(PREFIXES)


def split_name(name: str) -> tuple[str, str]:
    """``"timm:resnet50"`` -> ``("timm", "resnet50")``."""
    library, _, arch = name.partition(":")
    if not arch:
        raise SpecdistillError(f"model.name={name!r} names no architecture after '{library}:'; "
                               "e.g. torchvision:resnet50, timm:resnet50, python:mypackage.models:build")
    return library, arch


def build_library_model(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    """The library's model with a ``num_classes`` head (the library's own weights if ``pretrained``)."""
    library, arch = split_name(name)
    if library == "torchvision":
        return _torchvision(arch, num_classes, pretrained)
    if library == "timm":
        return _timm(arch, num_classes, pretrained)
    return _entry_point(arch, num_classes, pretrained)


def _torchvision(arch: str, num_classes: int, pretrained: bool) -> nn.Module:
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise SpecdistillError(f"torchvision has no classification model {arch!r}; choose one of "
                               "torchvision.models.list_models(), e.g. resnet50, convnext_tiny, vit_b_16")
    if not pretrained:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        net = torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError) as exc:   # URLError is an OSError
        raise SpecdistillError(
            f"model.pretrained=true: torchvision's {weights} weights are not cached and could not be "
            f"downloaded ({type(exc).__name__}); copy {Path(weights.url).name} (from {weights.url}) to "
            f"{cached}, or give a local file with generalist.weights") from None
    return net


def _timm(arch: str, num_classes: int, pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        raise SpecdistillError(f"timm has no model {arch!r}; choose one of timm.list_models(), "
                               "e.g. resnet50, convnext_tiny, vit_small_patch16_224")
    if not pretrained:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    try:
        return timm.create_model(arch, pretrained=True)
    except Exception as exc:  # huggingface_hub raises its own errors offline (LocalEntryNotFoundError, ...)
        from huggingface_hub.constants import HF_HUB_CACHE

        raise SpecdistillError(
            f"model.pretrained=true: timm's weights for {arch} are not cached and could not be downloaded "
            f"({type(exc).__name__}); fill the Hugging Face cache {HF_HUB_CACHE} on a machine that is online "
            "(timm.create_model(arch, pretrained=True)), or give a local file with generalist.weights") from None


def _entry_point(target: str, num_classes: int, pretrained: bool) -> nn.Module:
    module_name, _, function_name = target.partition(":")
    if not function_name:
        raise SpecdistillError(f"model.name=python:{target} needs the form python:<module>:<function>, "
                               "e.g. python:mypackage.models:build")
    if pretrained:
        raise SpecdistillError(f"model.pretrained=true has no meaning for python:{target}; give its weights "
                               "with generalist.weights")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise SpecdistillError(f"model.name=python:{target}: cannot import it ({exc}); put the module on "
                               "PYTHONPATH on every machine that runs a stage") from None
    takes_classes = "num_classes" in inspect.signature(function).parameters
    net = function(num_classes=num_classes) if takes_classes else function()
    if not isinstance(net, nn.Module):
        raise SpecdistillError(f"python:{target} returned a {type(net).__name__}, not a torch nn.Module; "
                               "make it return the model")
    return net


def default_normalization(name: str, net: nn.Module | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std a library model's weights expect: timm's ``pretrained_cfg`` where it has one,
    ImageNet's otherwise (what torchvision's weights and its training references use)."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if name.startswith("timm:") and cfg.get("mean") and cfg.get("std"):
        return tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"]))
    return IMAGENET_MEAN, IMAGENET_STD


def find_head(net: nn.Module) -> tuple[str, nn.Linear]:
    """The dotted name and module of the layer mapping features to classes: timm's own
    ``get_classifier()`` where it is a Linear, else the last ``nn.Linear`` (the head of every
    torchvision classifier)."""
    own = net.get_classifier() if hasattr(net, "get_classifier") else None
    if isinstance(own, nn.Linear):
        return next((name, module) for name, module in net.named_modules() if module is own)
    linears = [(name, module) for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise SpecdistillError(f"{type(net).__name__} has no nn.Linear layer to use as the class head; "
                               "end the model with nn.Linear(features, num_classes)")
    return linears[-1]


def detach_head(net: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Replace ``net``'s last Linear by ``nn.Identity`` (in place); return ``(net, the Linear)``."""
    name, linear = find_head(net)
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return net, linear


def head_size(state_dict: dict[str, torch.Tensor], net: nn.Module) -> int | None:
    """How many classes a state dict's head has (the weight of ``net``'s last Linear), if it has one."""
    name, _ = find_head(net)
    weight = state_dict.get(f"{name}.weight")
    return int(weight.shape[0]) if weight is not None else None


def describe(net: nn.Module) -> dict[str, Any]:
    """What the run directory records about where a library model came from."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return {key: cfg[key] for key in ("architecture", "tag", "hf_hub_id", "input_size") if key in cfg}
