"""Command-line plumbing shared by every stage, and the ``specdistill`` console command.

Each stage module has its own ``main`` (``python -m generalist.train``); ``specdistill <command>``
dispatches to them by module name, so this package never imports a stage at import time.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from specdistill.artifacts import write_text
from specdistill.config import Config, config_hash, dump_config, load_config
from specdistill.errors import SpecdistillError, exit_on_error
from specdistill.owner import claim
from specdistill.paths import find_config
from specdistill.rundir import RunDir


def stage_parser(description: str) -> argparse.ArgumentParser:
    """The flags every stage understands: --config, --set KEY=VALUE, --run-dir, --force."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "-c", help="experiment YAML (see configs/): from the current directory, else "
                        "the project home ($SPECDISTILL_HOME, else this checkout); defaults if omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set generalist.train.epochs=3 (repeatable)")
    parser.add_argument("--run-dir", help="run directory; '~' expands, a relative path lies under the project home "
                        "(default: <home>/runs/<name>)")
    parser.add_argument("--force", action="store_true", help="redo this stage even if it finished")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The config of ``--config`` (found from any working directory: ``specdistill.paths``) with the
    overrides; prints the absolute run directory the command will use."""
    overrides = list(args.overrides or [])
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={args.run_dir}")
    cfg = load_config(find_config(args.config) if args.config else None, overrides)
    print(f"run directory: {cfg.run_path}", flush=True)
    return cfg


def prepare_run_dir(cfg: Config, force: bool = False) -> Path:
    """Claim the run directory for this process (``specdistill.owner``: a lock, and a refusal of a
    directory holding other data unless ``force``), then record the resolved config and its hash."""
    run = RunDir.of(cfg)
    claim(run, cfg, force)
    write_text(run.config, f"# config hash: {config_hash(cfg)}\n" + dump_config(cfg), only_if_changed=True)
    return run.root


def setup_environment() -> None:
    """Quiet, reproducible defaults for every entry point."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("KMP_WARNINGS", "0")


# The stages, in pipeline order: module, the function ``specdistill run`` calls, the command name of
# ``specdistill <command>`` (which calls the module's ``main``), and its help line.
STAGE_ENTRY_POINTS = {
    "generalist": ("generalist.train", "run_generalist", "generalist", "stage 1: train the generalist"),
    "clustering": ("clustering.build", "run_clustering", "cluster",
                   "stage 2: confusable groups from the generalist's held-out predictions"),
    "specialists": ("specialists.fanout", "run_specialists", "specialists", "stage 3: train the specialists on Ray"),
    "combine": ("combine.evaluate", "run_combine", "combine",
                "stage 4: combine generalist + specialists, paper tables 3 and 4"),
    "student": ("student.train", "run_student", "student", "stage 5: distil the ensemble into one student"),
}
COMMANDS = {"run": ("specdistill.pipeline", "the whole pipeline, generalist to student"),
            **{command: (module, text) for module, _, command, text in STAGE_ENTRY_POINTS.values()},
            "import": ("generalist.importing", "stage 1 from a model you trained: torchvision, timm or your own"),
            "export": ("student.export", "write the student as ONNX + class names + preprocessing, checked against "
                       "PyTorch")}


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        print("usage: specdistill COMMAND [options]   (specdistill COMMAND --help for its options)\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<{width}}  {text}")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SpecdistillError(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")
    setup_environment()
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"specdistill {command}", *rest]
    module.main(rest)


if __name__ == "__main__":
    main()
