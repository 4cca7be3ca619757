"""The records stages hand each other through the run directory, each read and written here only.

* :class:`Clusters` - ``clustering/clusters.json``: the confusable groups (class ids + names).
* :class:`SpecialistInfo` - ``specialists/<m>.json``: a specialist's classes, dustbin correction, metrics.
* :class:`CombineResult` - ``combine/eval.json``: every system's metrics per split, paper tables 3 and 4.

Reading checks what a later stage relies on (class ids in range, a finite dustbin correction...), so
a hand-edited or truncated file is one :class:`SpecdistillError` line naming the file and the fix,
not a ``KeyError`` three stages later. Each number is stored once: the ensemble's accuracy is
``systems[ensemble].accuracy`` of a split; table 3 is derived from it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specdistill.artifacts import read_json, write_json
from specdistill.errors import SpecdistillError


def _class_ids(raw: Any, where: str, num_classes: int | None, fix: str) -> list[int]:
    if not isinstance(raw, list) or not raw:
        raise SpecdistillError(f"{where} names no classes; {fix}")
    bad = [c for c in raw if not isinstance(c, int) or isinstance(c, bool) or c < 0
           or (num_classes is not None and c >= num_classes)]
    if bad:
        limit = f" (the generalist has {num_classes} classes)" if num_classes is not None else ""
        raise SpecdistillError(f"{where} names class {bad[0]!r}{limit}; {fix}")
    if len(set(raw)) != len(raw):
        raise SpecdistillError(f"{where} lists a class twice; {fix}")
    return list(raw)


# ---------------------------------------------------------------------------------------------- groups


@dataclass
class Group:
    id: int
    classes: list[int]
    names: list[str]
    num_core: int | None = None   # members before the overlap step added look-alikes


@dataclass
class Clusters:
    """``clusters.json``: the groups plus how they were found (``details``: parameters, coverage, timings)."""

    num_classes: int
    class_names: list[str]
    groups: list[Group]
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        groups = [{k: v for k, v in asdict(g).items() if v is not None} for g in self.groups]
        return {"num_classes": self.num_classes, "class_names": self.class_names, "groups": groups,
                **self.details}

    def write(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())

    @classmethod
    def read(cls, path: str | os.PathLike, num_classes: int | None = None) -> Clusters:
        """Read and check; ``num_classes`` (the generalist's) must match the file's when given."""
        path = Path(path)
        raw = read_json(path)
        fix = "rerun clustering (specdistill run CONFIG --from clustering)"
        if not isinstance(raw, dict) or not isinstance(raw.get("groups"), list):
            raise SpecdistillError(f"{path} has no list of groups; {fix}")
        found = raw.get("num_classes", num_classes)
        if not isinstance(found, int) or (num_classes is not None and found != num_classes):
            raise SpecdistillError(f"{path} is for {found} classes but the generalist has {num_classes}; {fix}")
        names = raw.get("class_names") or [f"class {c}" for c in range(found)]
        groups = []
        for position, g in enumerate(raw["groups"]):
            if not isinstance(g, dict):
                raise SpecdistillError(f"{path}: group {position} is not an object; {fix}")
            gid = g.get("id", position)
            if not isinstance(gid, int) or isinstance(gid, bool):
                raise SpecdistillError(f"{path}: group {position} has id {gid!r}, not an integer; {fix}")
            classes = _class_ids(g.get("classes"), f"{path}: group {gid}", found, fix)
            groups.append(Group(gid, classes, list(g.get("names") or [names[c] for c in classes]),
                                g.get("num_core")))
        if not groups:
            raise SpecdistillError(f"{path} has no groups; rerun clustering with k >= 1")
        if len({g.id for g in groups}) != len(groups):
            raise SpecdistillError(f"{path} repeats a group id; {fix}")
        details = {k: v for k, v in raw.items() if k not in ("num_classes", "class_names", "groups")}
        return cls(found, list(names), groups, details)


# ---------------------------------------------------------------------------------------------- specialists


@dataclass
class SpecialistInfo:
    """``specialists/<m>.json``; the weights file's metadata repeats it (see ``specialists.store``)."""

    id: int
    classes: list[int]
    names: list[str]
    dustbin_correction: float   # added to the dustbin logit: log of the group's oversampling factor
    group_share: float | None = None          # the group's natural share of the training data (pi)
    training_fraction: float | None = None    # its share in the specialist's batches (f)
    key: str | None = None                    # what it was trained from (config, generalist, group)
    metrics: dict[str, Any] = field(default_factory=dict)
    ran_on: dict[str, Any] | None = None
    weights_sha256: str | None = None          # of the weights file: a swapped file is noticed

    @property
    def oversampling_factor(self) -> float:
        return math.exp(self.dustbin_correction)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["oversampling_factor"] = self.oversampling_factor
        return out

    def write(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())

    @classmethod
    def read(cls, path: str | os.PathLike, num_classes: int | None = None) -> SpecialistInfo:
        path = Path(path)
        raw = read_json(path)
        fix = "rerun the specialists stage (specdistill run CONFIG --from specialists)"
        if not isinstance(raw, dict):
            raise SpecdistillError(f"{path} is not a specialist record; {fix}")
        classes = _class_ids(raw.get("classes"), str(path), num_classes, fix)
        correction = raw.get("dustbin_correction")
        if not isinstance(correction, (int, float)) or not math.isfinite(correction):
            raise SpecdistillError(f"{path} has no finite dustbin_correction ({correction!r}); {fix}")
        names = raw.get("names") or [f"class {c}" for c in classes]
        known = {k: raw[k] for k in ("group_share", "training_fraction", "key", "metrics", "ran_on",
                                     "weights_sha256") if k in raw}
        return cls(int(raw.get("id", int(path.stem) if path.stem.isdigit() else -1)), classes, list(names),
                   float(correction), **known)


# ---------------------------------------------------------------------------------------------- combine


@dataclass
class SplitEvaluation:
    """Every compared system on one labelled split (``val`` or ``test``) of the same examples."""

    num_examples: int
    systems: dict[str, dict[str, Any]]   # name -> accuracy, top5, nll, ece, conditional_accuracy
    table4: list[dict[str, Any]]         # rows by the number of specialists covering the true class
    conditional_examples: int            # examples whose true class is in some group
    active_specialists: dict[str, Any]   # mean, none, histogram, solver iterations
    timings: dict[str, Any] = field(default_factory=dict)
    table4_causes: list[dict[str, Any]] = field(default_factory=list)   # combine.diagnose: broken/fixed by whom


@dataclass
class CombineResult:
    """``combine/eval.json``. ``ensemble`` names the system of tables 3 and 4 (``kl_top<n>``)."""

    num_classes: int
    num_specialists: int
    top_n: int
    solver: str
    ensemble: str
    splits: dict[str, SplitEvaluation]
    specialist_ids: list[int] = field(default_factory=list)
    gate: dict[str, Any] | None = None   # combine.gating.Gate, fitted on the held-out split, when configured
    rivals: dict[str, Any] | None = None   # combine.rivals: compute-matched generalists, when configured
    cross_fit: dict[str, Any] | None = None   # combine.choices.cross_fit: the held-out check, when configured

    def split(self, name: str = "test") -> SplitEvaluation:
        if name not in self.splits:
            raise SpecdistillError(f"the combine result has no '{name}' split (it has {', '.join(self.splits)}); "
                                   "rerun the combine stage (specdistill run CONFIG --from combine)")
        return self.splits[name]

    def accuracy(self, system: str, split: str = "test") -> float:
        return self.split(split).systems[system]["accuracy"]

    def ensemble_acc(self, split: str = "test") -> float:
        return self.accuracy(self.ensemble, split)

    def generalist_acc(self, split: str = "test") -> float:
        return self.accuracy("generalist", split)

    def table3(self, split: str = "test") -> dict[str, Any]:
        """Paper table 3 (derived, not stored): accuracy and conditional accuracy, generalist vs ensemble."""
        s = self.split(split)
        gen, ens = s.systems["generalist"], s.systems[self.ensemble]
        return {"generalist_acc": gen["accuracy"], "ensemble_acc": ens["accuracy"],
                "generalist_conditional_acc": gen["conditional_accuracy"],
                "ensemble_conditional_acc": ens["conditional_accuracy"],
                "conditional_examples": s.conditional_examples}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())

    @classmethod
    def from_json(cls, raw: Any, where: str = "combine result") -> CombineResult:
        try:
            splits = {name: SplitEvaluation(**s) for name, s in raw["splits"].items()}
            result = cls(**{**raw, "splits": splits})
            result.split("test").systems[result.ensemble]["accuracy"]
        except (KeyError, TypeError, AttributeError, SpecdistillError) as exc:
            raise SpecdistillError(f"{where} is not a combine result of this specdistill ({type(exc).__name__}: "
                                   f"{exc}); rerun the combine stage (specdistill run CONFIG --from combine)") from None
        return result

    @classmethod
    def read(cls, path: str | os.PathLike) -> CombineResult:
        return cls.from_json(read_json(path), str(path))
