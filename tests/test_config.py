import subprocess
import sys

import pytest

from specdistill.config import load_config, parse_overrides, stage_hash
from specdistill.errors import SpecdistillError


def test_every_shipped_config_validates():
    from pathlib import Path

    configs = sorted(Path("configs").glob("*.yaml"))
    assert {"quickstart.yaml", "glyphs-latin.yaml", "hanzi-1k.yaml", "fashion-mnist.yaml",
            "imagenet-subset.yaml"} <= {p.name for p in configs}
    for path in configs:
        if path.name.startswith("cluster-"):
            continue  # Ray cluster-launcher configs, not experiments
        load_config(path)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["generalist.train.epochs=3", "generalist.train.amp=false", "name=x"])
    assert cfg.generalist.train.epochs == 3 and cfg.generalist.train.amp is False and cfg.name == "x"
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize("override, fragment", [
    ("data.colour=1", "unknown key 'data.colour'; allowed keys here: augment"),
    ("generalist.train.lr=-1", "'generalist.train.lr': Input should be greater than 0"),
    ("generalist.train.epochs=many", "'generalist.train.epochs'"),
    ("data.source=mnist", "'data.source'"),
    ("nosuchsection.x=1", "unknown key 'nosuchsection'"),
])
def test_bad_keys_give_one_line(override, fragment):
    with pytest.raises(SpecdistillError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_override_and_missing_file():
    with pytest.raises(SpecdistillError, match="expected KEY=VALUE"):
        load_config(None, ["generalist.train.epochs"])
    with pytest.raises(SpecdistillError, match="not found"):
        load_config("configs/does-not-exist.yaml")


def test_stage_hash_covers_only_upstream_sections():
    base = load_config(None)
    student_changed = load_config(None, ["student.loss.temperature=7"])
    assert stage_hash(base, "generalist") == stage_hash(student_changed, "generalist")
    assert stage_hash(base, "combine") == stage_hash(student_changed, "combine")
    assert stage_hash(base, "student") != stage_hash(student_changed, "student")
    data_changed = load_config(None, ["data.image_size=28"])
    assert stage_hash(base, "generalist") != stage_hash(data_changed, "generalist")
    # how a stage runs (threads, Ray address) does not change what it produces
    assert stage_hash(base, "specialists") == stage_hash(load_config(None, ["specialists.ray_address=auto"]),
                                                           "specialists")


def test_cli_exits_nonzero_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "generalist.train", "--set", "data.bogus=1",
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: ") and "data.bogus" in proc.stderr


def test_options_added_later_keep_finished_runs_finished_where_they_change_nothing():
    from specdistill.config import stage_hash

    glyphs = load_config("configs/quickstart.yaml")
    natural = load_config("configs/quickstart.yaml", ["data.source=imagefolder", "data.root=/data"])
    # natural-image options mean nothing to a glyph run; workers change how, not what, is trained
    base = stage_hash(glyphs, "generalist")
    assert stage_hash(load_config("configs/quickstart.yaml", ["data.crop_scale=[0.5,1.0]"]), "generalist") == base
    assert stage_hash(load_config("configs/quickstart.yaml", ["generalist.model.mean=[0.5]",
                                                              "generalist.model.std=[0.5]"]), "generalist") != base
    assert stage_hash(load_config("configs/quickstart.yaml", ["generalist.train.workers=4"]), "generalist") == base
    # ...while an image-folder run, whose training recipe they describe, hashes them
    natural_base = stage_hash(natural, "generalist")
    cropped = load_config("configs/quickstart.yaml", ["data.source=imagefolder", "data.root=/data",
                                                       "data.crop_scale=[0.5,1.0]"])
    assert stage_hash(cropped, "generalist") != natural_base


def test_new_options_keep_old_hashes_and_check_each_other():
    """clustering.max_size, combine.alternatives and combine.weighting at their defaults leave every stage
    hash as it was (finished run directories stay finished); set, they enter it; combine.memory_limit_mb
    never does (how combine runs, not what it makes). max_size below min_size is one line naming both."""
    base = load_config("configs/quickstart.yaml")
    for stage in ("clustering", "combine"):
        assert stage_hash(load_config("configs/quickstart.yaml", ["clustering.max_size=null"]), stage) == \
            stage_hash(base, stage)
    assert stage_hash(load_config("configs/quickstart.yaml", ["clustering.max_size=50"]), "clustering") != \
        stage_hash(base, "clustering")
    assert stage_hash(load_config("configs/quickstart.yaml", ["combine.alternatives=false"]), "combine") != \
        stage_hash(base, "combine")
    assert stage_hash(load_config("configs/quickstart.yaml", ["combine.memory_limit_mb=1"]), "combine") == \
        stage_hash(base, "combine")
    for stage in ("combine", "student"):   # combine.weighting: equal is the old behaviour
        assert stage_hash(load_config("configs/quickstart.yaml", ["combine.weighting=equal"]), stage) == \
            stage_hash(base, stage)
        assert stage_hash(load_config("configs/quickstart.yaml", ["combine.weighting=fitted"]), stage) != \
            stage_hash(base, stage)
    with pytest.raises(SpecdistillError, match="clustering.max_size .* below clustering.min_size"):
        load_config("configs/quickstart.yaml", ["clustering.max_size=1", "clustering.min_size=2"])
