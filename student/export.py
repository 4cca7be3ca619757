"""A deployable model: the run's student (or generalist) as ONNX, with its class names and preprocessing.

    specdistill export --config configs/quickstart.yaml [--model generalist] [--check-examples 256]

Writes ``<run>/export/<model>/``: ``model.onnx``, ``classes.json`` (names in the order of the
logits) and ``preprocessing.json`` (how an image becomes the input, what comes out, and the check).

The graph takes what serving code produces without knowing this project: float32 NCHW in [0, 1]
(torchvision's ``ToTensor``; grey models take one channel), any batch size. It applies the scaling the
models were trained with itself (``specdistill.data.loading.to_float``, uint8 -> [-1, 1]) and then
the model, so whatever input normalisation a model carries is traced into the graph with it.

Nothing is written unless the exported graph, run by onnxruntime on held-out (val) images, gives
PyTorch's logits to within ``--tolerance``: the reference is the model fed exactly as training and
evaluation feed it (uint8 through ``to_float``), so the check covers the input convention too.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from specdistill.artifacts import atomic_path, write_json
from specdistill.cli import config_from_args, setup_environment, stage_parser
from specdistill.config import Config, stage_hash
from specdistill.data.loading import to_float
from specdistill.errors import SpecdistillError, exit_on_error
from specdistill.models import Classifier, load_classifier
from specdistill.owner import claim
from specdistill.provenance import current_identity, stale_reason
from specdistill.rundir import EXPORTABLE, RunDir

INPUT, OUTPUT = "image", "logits"
EXAMPLE_BATCH = 2          # the batch the graph is traced with; the batch axis is dynamic
CHECK_BATCH = 64           # batches of the check, another size than the trace's


class DeployedClassifier(nn.Module):
    """``forward(image) = model(image * scale + offset)``: [0, 1] images in, the model's logits out."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model
        self.scale, self.offset = training_input_affine()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image * self.scale + self.offset)


def training_input_affine() -> tuple[float, float]:
    """``(scale, offset)`` with ``to_float(u) == (u / 255) * scale + offset``, read off ``to_float``
    itself, so the graph follows the training convention wherever it is defined."""
    ends = to_float(torch.tensor([[[0, 255]]], dtype=torch.uint8)).flatten().tolist()
    return ends[1] - ends[0], ends[0]


def unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] or [N, H, W, C] -> float32 [N, C, H, W] in [0, 1]: what serving code feeds the graph."""
    x = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)


# ---------------------------------------------------------------------------------------------- the graph


def export_onnx(model: Classifier, channels: int, image_size: int, opset: int | None, name: str = "model") -> Any:
    """The model as an ``onnx.ModelProto`` (``torch.onnx.export``, the torch.export-based exporter)."""
    wrapped = DeployedClassifier(model).eval()
    example = torch.rand(EXAMPLE_BATCH, channels, image_size, image_size)
    try:
        program = torch.onnx.export(wrapped, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}},
                                    opset_version=opset, dynamo=True, external_data=False, verbose=False)
    except Exception as exc:   # the exporter's many failure types: one line, the chain for SPECDISTILL_TRACEBACK
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SpecdistillError(f"torch.onnx.export failed for {name} at opset "
                               f"{opset if opset is not None else 'default'} ({first[:300]}); try another "
                               "--opset, or set SPECDISTILL_TRACEBACK=1 for the exporter's traceback") from exc
    return program.model_proto


def opset_of(proto: Any) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def write_onnx(proto: Any, path: Path, metadata: dict[str, str]) -> None:
    import onnx

    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))


# ---------------------------------------------------------------------------------------------- the check


def compare_with_pytorch(onnx_path: Path, model: Classifier, images: np.ndarray,
                         progress: bool = True) -> dict[str, Any]:
    """Run the ONNX file (onnxruntime, CPU) on [0, 1] images and the model on the same uint8 images
    through ``to_float``; the largest absolute difference of their logits and how often their top-1 agrees."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    max_diff, agree = 0.0, 0
    model = model.cpu().eval()
    for start in tqdm(range(0, len(images), CHECK_BATCH), desc="check", disable=not progress, leave=False,
                      delay=2.0):   # a bar only when it takes a while
        batch = images[start:start + CHECK_BATCH]
        (exported,) = session.run([OUTPUT], {INPUT: unit_range(batch)})
        with torch.no_grad():
            reference = model(to_float(torch.from_numpy(np.ascontiguousarray(batch)))).numpy()
        if exported.shape != reference.shape:
            raise SpecdistillError(f"{onnx_path} gave logits of shape {exported.shape} where PyTorch gives "
                                   f"{reference.shape}; the export is broken, nothing was written")
        max_diff = float(np.max([max_diff, np.abs(exported - reference).max()]))   # NaN stays NaN
        agree += int((exported.argmax(1) == reference.argmax(1)).sum())
    return {"examples": len(images), "split": "val", "max_abs_diff": max_diff,
            "top1_agreement": agree / max(len(images), 1), "provider": "CPUExecutionProvider"}


def held_out_images(cfg: Config, count: int, channels: int, image_size: int) -> np.ndarray:
    """Up to ``count`` images of the held-out split, spread evenly over it (not the first class only);
    a streamed split decodes only those."""
    from specdistill.data import load_data

    split = load_data(cfg.data, cfg.seed).val
    images = split.images
    got_channels = 1 if images.ndim == 3 else images.shape[-1]
    if (got_channels, images.shape[1]) != (channels, image_size):
        raise SpecdistillError(f"the model takes {channels}x{image_size}px images but the config's data gives "
                               f"{got_channels}x{images.shape[1]}px; export with the config the run was made with")
    if count >= len(images):
        return images
    return images[np.unique(np.linspace(0, len(images) - 1, count).round().astype(np.int64))]


# ---------------------------------------------------------------------------------------------- the bundle


def preprocessing(meta: dict[str, Any], opset: int | None) -> dict[str, Any]:
    """What serving code must do to an image, and what the graph gives back (``preprocessing.json``)."""
    channels, size = meta["channels"], meta["image_size"]
    colour = "grey (one channel: convert colour images to luminance, PIL mode 'L')" if channels == 1 else "RGB"
    normalisation: dict[str, Any] = {"in_graph": "the graph scales [0, 1] to the range the model was trained on "
                                                 "and applies any mean/std itself; do not normalise again"}
    for key in ("mean", "std"):
        if (meta.get("model") or {}).get(key) is not None:
            normalisation[key] = meta["model"][key]
    return {
        "format": "specdistill-export/1",
        "file": "model.onnx",
        "opset": opset,
        "input": {"name": INPUT, "dtype": "float32", "layout": "NCHW", "shape": ["batch", channels, size, size],
                  "channels": channels, "colour": colour, "value_range": [0.0, 1.0]},
        "image_size": size,
        "steps": [f"decode the image as {'grey' if channels == 1 else 'RGB'}",
                  f"resize the shorter side to {size} px, bilinear and antialiased (torchvision Resize({size}))",
                  f"centre-crop {size}x{size} (torchvision CenterCrop({size}))",
                  "divide by 255 to float32 in [0, 1], channels first (torchvision ToTensor)"],
        "normalisation": normalisation,
        "output": {"name": OUTPUT, "shape": ["batch", meta["num_classes"]],
                   "meaning": "logits (unnormalised; softmax gives class probabilities), one per class in "
                              "the order of classes.json"},
        "classes": "classes.json",
        "num_classes": meta["num_classes"],
    }


def run_export(cfg: Config, model_kind: str = "student", check_examples: int = 256, opset: int | None = None,
               tolerance: float = 1e-3, progress: bool = True, first: str = "specdistill run CONFIG") -> dict[str, Any]:
    """Export a finished run's ``student`` or ``generalist``, check it against PyTorch, write the bundle.

    ``first`` is the command that makes the model, named when the run has none yet. Returns the
    preprocessing record, with ``check`` and the paths written.
    """
    if model_kind not in EXPORTABLE:
        raise SpecdistillError(f"--model {model_kind}: choose one of {', '.join(EXPORTABLE)}")
    run = RunDir.of(cfg)
    if run.root.is_dir():
        claim(run, cfg)   # one owner; refuses a directory holding another experiment
    require_current(run, model_kind, stage_hash(cfg, model_kind), first)
    weights = run.student_weights if model_kind == "student" else run.generalist_weights
    model, meta = load_classifier(weights)
    classes = list(meta.get("class_names") or [])
    if len(classes) != meta["num_classes"]:
        raise SpecdistillError(f"{weights} names {len(classes)} classes for a {meta['num_classes']}-class head; "
                               f"rerun the {model_kind} stage (--force)")

    proto = export_onnx(model, meta["channels"], meta["image_size"], opset, meta["model"].get("name", model_kind))
    record = preprocessing(meta, opset_of(proto))
    record["source"] = {"model": model_kind, "weights": str(weights.resolve()), "architecture": meta["model"],
                        "identity": current_identity(run, model_kind)}
    paths = (run.export_onnx(model_kind), run.export_preprocessing(model_kind), run.export_classes(model_kind))
    with atomic_path(paths[0]) as tmp:
        write_onnx(proto, tmp, {"specdistill.preprocessing": json.dumps(record),
                                "specdistill.classes": json.dumps(classes)})
        if check_examples > 0:
            images = held_out_images(cfg, check_examples, meta["channels"], meta["image_size"])
            record["check"] = compare_with_pytorch(tmp, model, images, progress)
            diff = record["check"]["max_abs_diff"]
            if not diff <= tolerance:   # NaN fails too
                raise SpecdistillError(
                    f"the ONNX {model_kind}'s logits differ from PyTorch's by up to {diff:.3g} on "
                    f"{len(images)} held-out images (tolerance {tolerance:g}); nothing was written. Try another "
                    "--opset, or raise --tolerance if that difference is acceptable")
        else:
            record["check"] = None
        record["versions"] = _versions()
        write_json(paths[2], classes)
        write_json(paths[1], record)
    record["written"] = [str(p.resolve()) for p in paths]
    return record


def require_current(run: RunDir, stage: str, digest: str, first: str) -> None:
    """The stage finished, for this config, on the inputs now on disk: else one line naming what to run."""
    reason = stale_reason(run.root, stage, digest)
    if reason == "not run yet":
        raise SpecdistillError(f"{run.root.resolve()} has no finished {stage} to export (no {run.done(stage)}); "
                               f"run `{first}` first")
    if reason is not None:
        raise SpecdistillError(f"the {stage} in {run.root.resolve()} is not current ({reason}); run `{first}` "
                               "first")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def first_command(args: argparse.Namespace, model_kind: str) -> str:
    """The command, as this one was given, that makes the model to export."""
    words = ["specdistill", "run", args.config or "CONFIG"]
    if args.run_dir:
        words += ["--run-dir", args.run_dir]
    for override in args.overrides:
        words += ["--set", override]
    if model_kind == "generalist":
        words += ["--until", "generalist"]
    return shlex.join(words)


def report(record: dict[str, Any]) -> str:
    check = record["check"]
    lines = [f"export: {record['source']['model']} -> {record['written'][0]} "
             f"(+ {record['written'][1]}, {record['written'][2]})"]
    if check is None:
        lines.append("export: not checked (--check-examples 0)")
    else:
        lines.append(f"export: onnxruntime vs PyTorch on {check['examples']} held-out images: max abs logit "
                     f"difference {check['max_abs_diff']:.3g}, top-1 agreement {check['top1_agreement']:.2%}")
    return "\n".join(lines)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    setup_environment()
    parser = stage_parser("Write a finished run's student (or generalist) as ONNX + class names + preprocessing, "
                          "checked against PyTorch on held-out images.")
    parser.add_argument("--model", choices=EXPORTABLE, default="student", help="which model to export")
    parser.add_argument("--check-examples", type=int, default=256, metavar="N",
                        help="held-out images to compare onnxruntime with PyTorch on (0: no check)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest absolute logit difference accepted (default 1e-3)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    args = parser.parse_args(argv)
    if args.check_examples < 0:
        parser.error("--check-examples must be 0 or more")
    record = run_export(config_from_args(args), args.model, args.check_examples, args.opset, args.tolerance,
                        first=first_command(args, args.model))
    print(report(record), flush=True)


if __name__ == "__main__":
    main()
