"""Stage 1 without training: bring in a generalist the user already has.

    specdistill import --config configs/imagenet-subset.yaml --model timm:resnet50 --weights r50.pth
    # the same as: specdistill generalist ... --set generalist.model.name=timm:resnet50 \\
    #                                        --set generalist.weights=r50.pth

The architecture comes from ``generalist.model.name`` (``torchvision:<arch>``, ``timm:<arch>``,
``python:<module>:<function>``, or a registered name) and its weights from ``generalist.weights``
(a ``state_dict`` saved with ``torch.save``, a safetensors file, or a checkpoint dict as timm's and
torchvision's training scripts save them) or, with ``generalist.model.pretrained: true``, from the
library itself. Nothing is unpickled: ``torch.load(weights_only=True)``. The class list comes from
the data: the head must have one output per class (or, for ImageNet-1k weights and class folders
named by WordNet id, the rows of those classes are kept). The stage then writes exactly the
artifacts a trained generalist writes, so every later stage runs unchanged.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specdistill.config import Config
from specdistill.data import Dataset, load_data
from specdistill.engine import resolve_device
from specdistill.errors import SpecdistillError, exit_on_error
from specdistill.hashing import digest_file
from specdistill.model_zoo import default_normalization, describe, detach_head, find_head, is_library_name
from specdistill.models import MODELS, Classifier, _RepeatChannels, build_model

# keys under which training scripts keep the weights in a checkpoint dict, most specific first:
# timm's train.py ("state_dict", "state_dict_ema"), torchvision's references ("model", "model_ema"),
# Lightning ("state_dict"), and the common hand-written "model_state_dict"
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, from any of the forms users save; one-line errors otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpecdistillError(f"generalist.weights: {path} does not exist; give the path of the trained "
                               "model's weights (a state_dict saved with torch.save, or a .safetensors file)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise SpecdistillError(f"generalist.weights: {path} is not a readable safetensors file ({exc}); "
                                   "save the weights again") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise SpecdistillError(
                f"generalist.weights: {path} holds a pickled Python object (a whole model, or a checkpoint "
                "with objects in it), not plain tensors; nothing is unpickled here: save the weights with "
                "torch.save(model.state_dict(), path)") from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise SpecdistillError(f"generalist.weights: {path} is corrupt or not a torch.save file "
                                   f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); save it again") from None
    state = _unwrap(state, path)
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise SpecdistillError(f"generalist.weights: {path} holds NaN or infinite values (tensor {bad[0]}); "
                               "export the weights of a healthy checkpoint")
    return state


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint dict, with DistributedDataParallel's ``module.`` prefix off."""
    if isinstance(state, nn.Module):   # only reachable if weights_only let a module through
        raise SpecdistillError(f"generalist.weights: {path} is a whole model object; save its state_dict")
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in CHECKPOINT_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            raise SpecdistillError(
                f"generalist.weights: {path} is a dict without weights under any of {', '.join(CHECKPOINT_KEYS)} "
                f"(it has: {', '.join(map(str, list(state)[:8]))}); save model.state_dict() itself")
        state = inner
    if not isinstance(state, dict) or not state:
        raise SpecdistillError(f"generalist.weights: {path} holds no tensors; save model.state_dict()")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def imagenet_rows(class_names: list[str], head_rows: int) -> list[int] | None:
    """For an ImageNet-1k head and class folders named by WordNet id (n01440764, ...): the head row
    of each class, in the data's order; None when that does not apply."""
    if head_rows != 1000:
        return None
    from timm.data import ImageNetInfo

    index = {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}
    return [index[name] for name in class_names] if all(name in index for name in class_names) else None


def library_net(cfg: Config) -> tuple[nn.Module | None, dict[str, torch.Tensor] | None]:
    """The architecture with its weights loaded (the library's if ``pretrained``, else the user's;
    its head as the weights have it), or ``(None, state)`` for a project architecture. Needs no data,
    so bad weights stop before any image is read."""
    from specdistill.model_zoo import build_library_model

    mcfg, gcfg = cfg.generalist.model, cfg.generalist
    if not is_library_name(mcfg.name):
        MODELS.get(mcfg.name)   # the one-line "unknown model" error
        if gcfg.weights is None:
            raise SpecdistillError(f"model.pretrained=true needs a torchvision: or timm: model, not {mcfg.name}; "
                                   "give generalist.weights instead")
        return None, read_state_dict(gcfg.weights)
    if mcfg.pretrained and gcfg.weights is None:
        return build_library_model(mcfg.name, 1000, pretrained=True), None
    state = read_state_dict(gcfg.weights)
    net = build_library_model(mcfg.name, 1000, pretrained=False)
    name, _ = find_head(net)
    rows = state.get(f"{name}.weight")
    if rows is not None and rows.shape[0] != 1000:   # build with the file's head size
        net = build_library_model(mcfg.name, int(rows.shape[0]), pretrained=False)
    _load(net, state, cfg)
    return net.eval(), state


def _load(net: nn.Module, state: dict[str, torch.Tensor], cfg: Config) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        shown = "; ".join(lines)[:300]
        raise SpecdistillError(
            f"generalist.weights: {cfg.generalist.weights} is not a {cfg.generalist.model.name} state dict "
            f"({shown}); set generalist.model.name to the architecture the weights were saved from") from None


def imported_classifier(cfg: Config, dataset: Dataset, loaded: tuple) -> tuple[Classifier, dict[str, Any]]:
    """The user's model (``loaded`` by :func:`library_net`) as a Classifier over ``dataset``'s
    classes, and what to record about it."""
    mcfg, k = cfg.generalist.model, dataset.num_classes
    net, state = loaded
    if net is None:   # a project architecture: its state dict is a Classifier's already
        model = build_model(mcfg.model_copy(update={"pretrained": False}), k, dataset.channels, dataset.image_size)
        _load(model, state, cfg)
        return model, {"weights": str(Path(cfg.generalist.weights).expanduser().resolve())}
    probe = torch.randn(2, 3, dataset.image_size, dataset.image_size)
    with torch.no_grad():
        expected = net(probe)
    net, linear = detach_head(net)
    rows = None
    if linear.out_features != k:
        rows = imagenet_rows(dataset.class_names, linear.out_features)
        if rows is None:
            source = cfg.generalist.weights or f"{mcfg.name} pretrained"
            raise SpecdistillError(
                f"the head of {source} has {linear.out_features} classes but the data has {k} "
                f"({dataset.name}: {', '.join(dataset.class_names[:4])}, ...); import weights trained on "
                "these classes (in the data's sorted class order), or train the generalist instead")
    model = Classifier(net, linear.in_features, linear.out_features)
    model.head = linear
    with torch.no_grad():
        got = model(probe)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise SpecdistillError(
            f"{mcfg.name}: its last nn.Linear is not the final layer of its forward (outputs differ by "
            f"{(got - expected).abs().max().item():.3g}); end the model with the class Linear")
    if rows is not None:
        head = nn.Linear(linear.in_features, k)
        with torch.no_grad():
            head.weight.copy_(linear.weight[rows])
            head.bias.copy_(linear.bias[rows])
        model.head = head
    if dataset.channels != 3:
        model.backbone = nn.Sequential(_RepeatChannels(3), model.backbone)
    mean, std = (mcfg.mean, mcfg.std) if mcfg.mean is not None else default_normalization(mcfg.name, net)
    model.set_input_normalization(list(mean), list(std))
    source: dict[str, Any] = {"weights": (str(Path(cfg.generalist.weights).expanduser().resolve())
                                          if cfg.generalist.weights else "pretrained"), **describe(net)}
    if rows is not None:
        source["head_rows"] = "ImageNet-1k rows of the class folders' WordNet ids"
    source["mean"], source["std"] = list(mean), list(std)
    return model, source


def imports(cfg: Config) -> bool:
    """Whether the generalist stage imports a model instead of training one."""
    return cfg.generalist.weights is not None or cfg.generalist.model.pretrained


def weights_digest(cfg: Config) -> str | None:
    """The content digest of the imported weights file (None for library weights or training)."""
    return digest_file(Path(cfg.generalist.weights).expanduser()) if cfg.generalist.weights else None


def import_generalist(cfg: Config, out_dir: str | Path, dataset: Dataset | None = None,
                      loaded: tuple | None = None) -> dict[str, Any]:
    """Import, evaluate on held-out and test data, and write the generalist's artifacts to ``out_dir``
    (``loaded``: what :func:`library_net` returned, when the caller checked the weights already)."""
    from generalist.train import write_generalist

    started = time.perf_counter()
    loaded = loaded or library_net(cfg)
    dataset = dataset or load_data(cfg.data, cfg.seed)
    model, source = imported_classifier(cfg, dataset, loaded)
    source["sha256"] = weights_digest(cfg)
    # the stored architecture rebuilds this model exactly: its normalisation, and no library download
    update: dict[str, Any] = {"pretrained": False}
    if "mean" in source:
        update.update(mean=source["mean"], std=source["std"])
    model_cfg = cfg.generalist.model.model_copy(update=update)
    return write_generalist(cfg, Path(out_dir), model, dataset, resolve_device(cfg.device), model_cfg,
                            {"imported": source}, started)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    from generalist.train import run_generalist
    from specdistill.cli import config_from_args, setup_environment, stage_parser

    setup_environment()
    parser = stage_parser("Stage 1 from a model you already trained: import it as the generalist.")
    parser.add_argument("--model", help="architecture: torchvision:<arch>, timm:<arch> or python:<module>:<function> "
                        "(sets generalist.model.name)")
    parser.add_argument("--weights", help="its weights: a state_dict (torch.save), .safetensors, or a "
                        "timm/torchvision checkpoint (sets generalist.weights)")
    parser.add_argument("--pretrained", action="store_true", help="the library's own weights instead")
    args = parser.parse_args(argv)
    args.overrides = list(args.overrides)
    if args.model:
        args.overrides.append(f"generalist.model.name={args.model}")
    if args.weights:
        args.overrides.append(f"generalist.weights={Path(args.weights).expanduser().resolve()}")
    if args.pretrained:
        args.overrides.append("generalist.model.pretrained=true")
    cfg = config_from_args(args)
    if not imports(cfg):
        raise SpecdistillError("specdistill import needs --weights PATH or --pretrained (or generalist.weights "
                               "in the config); to train a generalist, run specdistill generalist")
    run_generalist(cfg, force=args.force)


if __name__ == "__main__":
    main()
