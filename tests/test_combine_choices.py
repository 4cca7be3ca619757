"""combine/choices.py: the held-out choices made in one place, and checked on held-out folds they were
not fitted on (combine.cross_fit); SplitOutputs.subset, which the check reads through."""

import json

import numpy as np
import pytest
import torch

from combine.choices import cross_fit, fit_choices, fold_ids
from combine.outputs import SplitOutputs
from specdistill.config import CombineConfig, validate_config
from specdistill.errors import SpecdistillError


def test_folds_cut_each_class_in_stored_order_so_a_font_major_split_gives_one_font_per_fold():
    fonts, classes, copies = 3, 5, 2
    labels = np.tile(np.repeat(np.arange(classes), copies), fonts)      # font by font, as the glyph sources store
    font = np.repeat(np.arange(fonts), classes * copies)
    assert np.array_equal(fold_ids(labels, 3), font)
    # a class-sorted split (an image folder's): every fold holds every class, in consecutive runs
    ids = fold_ids(np.repeat(np.arange(4), 7), 3)
    for c in range(4):
        run = ids[c * 7:(c + 1) * 7]
        assert set(run) == {0, 1, 2} and np.all(np.diff(run) >= 0)
    assert np.bincount(ids).tolist() == [12, 8, 8]


def planted_outputs(chunk_rows=None, held_whole=True):
    """Classes 0..3, two "fonts" stored one after the other, 2 copies per class each. The generalist gets
    classes 0 and 1 wrong (it swaps them, 0.6 / 0.4) and 2, 3 right. One specialist over {0, 1}: right
    and sure on font 0, wrong like the generalist on font 1."""
    K, copies = 4, 2
    labels = np.tile(np.repeat(np.arange(K), copies), 2)
    font = np.repeat([0, 1], K * copies)
    gen = np.full((len(labels), K), 0.0)
    spec = np.full((len(labels), 3), 1 / 3)
    for i, (y, f) in enumerate(zip(labels, font)):
        if y < 2:
            gen[i, y], gen[i, 1 - y], gen[i, 2:] = 0.38, 0.6, 0.01
            spec[i] = [0.95, 0.04, 0.01] if y == 0 else [0.04, 0.95, 0.01]
            if f == 1:
                spec[i] = [0.3, 0.6, 0.1] if y == 0 else [0.6, 0.3, 0.1]
        else:
            gen[i] = 0.02
            gen[i, y] = 0.94
    gen_lp = torch.log(torch.tensor(gen, dtype=torch.float32))
    outputs = SplitOutputs.from_arrays(gen_lp, [torch.tensor([0, 1])], [torch.log(torch.tensor(spec).float())],
                                       labels, top_ns=[1], chunk_rows=chunk_rows)
    if not held_whole:   # the generalist computed a chunk at a time, as at 15,000 classes
        calls = []

        def gen_rows(lo, hi):
            calls.append((lo, hi))
            return gen_lp[lo:hi]

        outputs = SplitOutputs(K, outputs.groups, labels, outputs.top1, outputs.top, outputs.spec_rows,
                               outputs.spec_values, gen_rows=gen_rows, chunk_rows=chunk_rows)
        outputs.calls = calls
    return outputs, labels, font


def test_subset_holds_the_rows_asked_for_whole_or_computed_a_chunk_at_a_time():
    whole, labels, _ = planted_outputs()
    lazy, _, _ = planted_outputs(chunk_rows=4, held_whole=False)
    rows = np.array([1, 2, 9, 14, 15])
    for outputs in (whole, lazy):
        part = outputs.subset(rows)
        assert part.labels.tolist() == labels[rows].tolist()
        chunks = list(part.chunks())
        gen = torch.cat([c.gen for c in chunks])
        assert torch.equal(gen, whole._gen_whole[rows])
        spec = torch.cat([c.specs[0] for c in chunks])
        assert torch.allclose(spec, whole.spec_values[0][rows])
    assert sorted(set(lazy.calls)) == [(0, 4), (8, 12), (12, 16)]   # the parent's own chunks, only those needed
    with pytest.raises(ValueError, match="sorted"):
        whole.subset(np.array([3, 1]))


def test_cross_fit_shows_a_gate_that_held_out_data_flatters():
    """The specialist helps on font 0 only, so the gate fitted on both fonts keeps it and the held-out
    accuracy counts font 0's four fixes; fitted on font 1 alone the gate closes it, and font 0 left out
    loses them: the cross-fitted held-out accuracy is the generalist's."""
    outputs, labels, font = planted_outputs()
    rule = CombineConfig(top_n=1, gate="group_gain")
    fitted = fit_choices(outputs, rule, progress=lambda line: None)
    assert fitted[1].keep == [True]
    lines = []
    record = cross_fit(outputs, rule, 2, fitted, progress=lines.append)
    first, second = record["per_fold"]
    assert (first["examples"], first["generalist"], first["fitted_on_all"], first["fitted_on_others"]) == (8, 4, 8, 4)
    assert (first["kept"], first["ungated_on_others"]) == (0, 8)
    assert (second["generalist"], second["fitted_on_all"], second["fitted_on_others"], second["kept"]) == (4, 4, 4, 1)
    assert record["total"] == {"examples": 16, "generalist": 8, "fitted_on_all": 12, "fitted_on_others": 8,
                               "ungated_on_others": 12}
    assert any("fold 1 of 2 left out: gate 'group_gain'" in line for line in lines)
    # nothing fitted (no gate, no calibration): both columns are the ensemble's own count
    plain = CombineConfig(top_n=1)
    record = cross_fit(outputs, plain, 2, fit_choices(outputs, plain, progress=lambda line: None),
                       progress=lambda line: None)
    assert record["total"]["fitted_on_all"] == record["total"]["fitted_on_others"] == 12
    with pytest.raises(SpecdistillError, match="fewer examples than folds"):
        cross_fit(outputs, rule, 5, fitted, progress=lambda line: None)


def test_one_fold_is_refused_in_the_config(tmp_path):
    with pytest.raises(SpecdistillError, match="cross_fit"):
        validate_config({"run_dir": str(tmp_path), "combine": {"cross_fit": 1}})
    assert validate_config({"run_dir": str(tmp_path), "combine": {"cross_fit": 3}}).combine.cross_fit == 3


def test_the_combine_stage_adds_the_check_after_the_fact_without_redoing_anything(tiny_combine_run):
    """combine.cross_fit changes no output: asked for on a finished combine stage, it is computed with the
    stored gate, added to eval.json and the report, and the predictions and done.json stay as they were."""
    from combine.evaluate import main
    from specdistill.config import stage_hash

    run = tiny_combine_run.run
    out = run / "combine"
    main(["--run-dir", str(run), "--set", "combine.gate=both"])
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("preds-val.npy", "done.json", "gating.json")}
    gated = json.loads((out / "eval.json").read_text())
    assert gated["cross_fit"] is None
    asked = validate_config({"run_dir": str(run), "combine": {"gate": "both", "cross_fit": 2}})
    assert stage_hash(asked, "combine") == json.loads((out / "done.json").read_text())["config_hash"]
    main(["--run-dir", str(run), "--set", "combine.gate=both", "--set", "combine.cross_fit=2"])
    record = json.loads((out / "eval.json").read_text())["cross_fit"]
    assert record["folds"] == 2 and record["total"]["examples"] == 40
    held_out = gated["splits"]["val"]["systems"]["kl_top1"]["accuracy"]
    assert record["total"]["fitted_on_all"] == round(held_out * 40)   # the stored gate, on the same examples
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps
    assert "## Held-out choices checked on examples they were not fitted on" in (out / "report.md").read_text()
