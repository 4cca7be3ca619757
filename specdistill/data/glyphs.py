"""glyphs-latin: letters and digits rendered from the fonts that ship inside matplotlib (pip-only).

Classes: digits, Latin (basic, Latin-1 Supplement, Latin Extended-A, the pinyin and Romanian
letters of Extended-B), Greek (with tonos) and Cyrillic (Russian, Ukrainian, Serbian, Kazakh).
Characters that render identically (Latin A, Greek Α, Cyrillic А) are one class, named by the
member that comes first in Latin, digits, Greek, Cyrillic order; ``meta["merged"]`` lists them.
What remains is a label space with real look-alike families (e é è ê ë ē ě; l 1 I; O 0 Ө).

Faces: the DejaVu Sans / Sans Mono / Serif and STIX General families, four styles each. Faces, not
families, go to the splits (there are only four families), chosen so that every split has sans,
serif and monospace designs and that no face is in two splits: 10 train, 3 val, 3 test.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np

from specdistill.config import DataConfig
from specdistill.data import DATA_SOURCES, Dataset
from specdistill.data.cache import load_or_build
from specdistill.data.jitter import Jitter
from specdistill.data.render import Face, FaceRenderer, Layout, has_ink, render_split
from specdistill.errors import SpecdistillError

# Faces per split (file names in matplotlib's mpl-data/fonts/ttf). The symbol-only STIXSize*,
# STIXNonUni*, cm* (TeX encodings), DejaVu*Display (a few dozen glyphs) and LastResort (boxes)
# faces draw none or few of these characters and are left out.
LATIN_FACES: dict[str, list[str]] = {
    "train": ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Oblique.ttf",
              "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
              "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralBolIta.ttf"],
    "val": ["DejaVuSans-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif-Bold.ttf"],
    "test": ["DejaVuSans-BoldOblique.ttf", "DejaVuSansMono-Bold.ttf", "STIXGeneralItalic.ttf"],
}
# Look-alikes are judged on the regular face of each training family.
REFERENCE_FACES = ("DejaVuSans.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "STIXGeneral.ttf")

# Code point ranges of the candidate characters (letters and digits only are kept).
_RANGES = [
    (0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A),   # digits, basic Latin
    (0xB5, 0xB5), (0xC0, 0xFF),                 # Latin-1 Supplement letters (µ, À..ÿ)
    (0x100, 0x17F),                             # Latin Extended-A
    (0x1CD, 0x1DC), (0x218, 0x21B),             # pinyin ǎ ǐ ǒ ǔ ǖ ǘ ǚ ǜ; Romanian ș ț
    (0x386, 0x3CE),                             # Greek, with tonos
    (0x400, 0x45F),                             # Cyrillic (Russian, Ukrainian, Serbian, ...)
    (0x490, 0x493), (0x49A, 0x49B), (0x4A2, 0x4A3), (0x4AE, 0x4B1), (0x4BA, 0x4BB),
    (0x4D8, 0x4D9), (0x4E8, 0x4E9),             # Ukrainian Ґ and Kazakh Ғ Қ Ң Ү Ұ Һ Ә Ө
]
_SCRIPT_ORDER = {"LATIN": 0, "DIGIT": 1, "MICRO": 0, "GREEK": 2, "CYRILLIC": 3}

LAYOUT = Layout(ref_char="H", ref_height=0.48, ref_center_y=0.46)
JITTER = Jitter()
SURVEY_SIZE = 32            # look-alikes are compared at this size
MIN_FACE_SHARE = 2 / 3      # a character is kept when at least this share of every split's faces draw it
SAME_PIXEL_LEVEL = 0.2      # pixels differing by more than this (in [0, 1]) count as different...
SAME_MAX_PIXELS = 2         # ...and two glyphs with at most this many such pixels render the same


def candidate_chars() -> list[str]:
    chars = [chr(c) for lo, hi in _RANGES for c in range(lo, hi + 1)]
    return [c for c in chars if unicodedata.category(c)[0] in "LN"]


def script_rank(char: str) -> int:
    return _SCRIPT_ORDER.get(unicodedata.name(char, "X").split()[0], 9)


def latin_faces() -> dict[str, list[Face]]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    missing = [name for names in LATIN_FACES.values() for name in names if not (folder / name).exists()]
    if missing:
        raise SpecdistillError(
            f"matplotlib's fonts {', '.join(missing)} are missing from {folder}; reinstall matplotlib "
            "(pip install --force-reinstall matplotlib)")
    return {split: [Face(str(folder / name), 0, Path(name).stem) for name in names]
            for split, names in LATIN_FACES.items()}


def survey(faces: list[Face], chars: list[str], canvas: int = SURVEY_SIZE) -> np.ndarray:
    """float32 [faces, chars, canvas, canvas] renderings without jitter (zeros where not drawn)."""
    return np.stack([FaceRenderer(face, LAYOUT, canvas).render_many(chars) for face in faces])


def merge_lookalikes(chars: list[str], reference: np.ndarray) -> list[list[str]]:
    """Group characters that render the same on most reference faces (``reference``: [F, C, H, W]).

    Two characters are one class when, on more than half of the reference faces that draw both,
    at most ``SAME_MAX_PIXELS`` pixels differ by more than ``SAME_PIXEL_LEVEL``. Groups are the
    connected components of that relation; each lists its name-giving member first.
    """
    n = len(chars)
    drawn = has_ink(reference.reshape(-1, *reference.shape[2:])).reshape(reference.shape[:2])
    flat = reference.reshape(reference.shape[0], n, -1)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        both = drawn[:, i:i + 1] & drawn[:, i + 1:]                            # [F, n-i-1]
        differing = (np.abs(flat[:, i:i + 1] - flat[:, i + 1:]) > SAME_PIXEL_LEVEL).sum(-1)
        same = ((differing <= SAME_MAX_PIXELS) & both).sum(0)
        for j in np.flatnonzero(2 * same > both.sum(0)) + i + 1:
            parent[root(int(j))] = root(i)
    groups: dict[int, list[str]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(chars[i])
    return [sorted(g, key=lambda c: (script_rank(c), ord(c))) for g in groups.values()]


def lookalike_families(class_names: list[str]) -> dict[str, list[str]]:
    """Classes sharing a base letter once accents are stripped (e: e é è ê ...), for reports."""
    families: dict[str, list[str]] = {}
    for name in class_names:
        base = unicodedata.normalize("NFD", name)[0]
        families.setdefault(base, []).append(name)
    return {base: names for base, names in families.items() if len(names) > 1}


def build_glyphs_latin(cfg: DataConfig) -> Dataset:
    faces = latin_faces()
    chars = candidate_chars()
    # which faces draw which characters: cmap entry, not the .notdef box, and ink
    drawn = {split: has_ink(survey(fs, chars).reshape(-1, SURVEY_SIZE, SURVEY_SIZE)).reshape(len(fs), -1)
             for split, fs in faces.items()}
    enough = np.all([d.sum(0) >= np.ceil(MIN_FACE_SHARE * len(d)) for d in drawn.values()], axis=0)
    kept = [c for c, ok in zip(chars, enough) if ok]
    dropped = [c for c, ok in zip(chars, enough) if not ok]

    by_name = {face.path.rsplit("/", 1)[-1]: face for fs in faces.values() for face in fs}
    reference = survey([by_name[name] for name in REFERENCE_FACES], kept)
    groups = sorted(merge_lookalikes(kept, reference), key=lambda g: kept.index(g[0]))
    if cfg.num_classes is not None:
        groups = groups[:cfg.num_classes]
    class_names = [g[0] for g in groups]

    index = {c: i for i, c in enumerate(chars)}
    splits = {}
    for s, (split, fs) in enumerate(faces.items()):
        class_drawn = drawn[split][:, [index[name] for name in class_names]]
        splits[split] = render_split(fs, class_names, class_drawn, LAYOUT, cfg.image_size,
                                     cfg.copies_per_font, JITTER, [cfg.data_seed, s], desc=f"glyphs-latin {split}")
    meta = {
        "faces": {split: [f.name for f in fs] for split, fs in faces.items()},
        "merged": {g[0]: g for g in groups if len(g) > 1},
        "codepoints": [[f"U+{ord(c):04X}" for c in g] for g in groups],
        "dropped": dropped,
        "families": lookalike_families(class_names),
        "copies_per_font": cfg.copies_per_font,
    }
    return Dataset("glyphs-latin", class_names, splits["train"], splits["val"], splits["test"], meta)


@DATA_SOURCES.register("glyphs-latin")
def load_glyphs_latin(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Rendered once into the cache; ``seed`` is unused (``cfg.data_seed`` seeds the jitter)."""
    import matplotlib

    options = {"source": "glyphs-latin", "image_size": cfg.image_size, "copies": cfg.copies_per_font,
               "num_classes": cfg.num_classes, "data_seed": cfg.data_seed,
               "matplotlib": matplotlib.__version__, "faces": LATIN_FACES}
    return load_or_build(cfg, "glyphs-latin", options, lambda: build_glyphs_latin(cfg))

