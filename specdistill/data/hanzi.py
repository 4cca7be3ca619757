"""glyphs-hanzi: common simplified Chinese characters rendered from CJK fonts of Debian packages.

Characters: GB2312 level 1 (3755 characters, rows 16-55, listed by Python's ``gb2312`` codec).
Level 1 is the "commonly used" half of GB2312, but it is ordered by pinyin, not by frequency, and
neither the standard library nor the installed packages carry a frequency list, so ``num_classes=N``
takes the first N characters in GB2312 order (skipping any that too few faces draw).

Faces: every face of the installed fonts whose cmap covers level 1, after
- skipping faces FreeType cannot open or draw (a warning names them);
- merging faces that render the same (regional variants of one design, e.g. Noto Sans CJK SC/JP/KR,
  or its Mono twin): faces drawing most probe characters identically count as one;
- checking every glyph for ink (and against the .notdef box): fonts claim characters they draw empty.
Faces are grouped by style (sans/hei, serif/song/ming, kai) and, within a style, whole families go to
one split (the largest family to train), so the test fonts are designs the model never saw.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from specdistill.config import DataConfig
from specdistill.data import DATA_SOURCES, Dataset
from specdistill.data.cache import load_or_build
from specdistill.data.jitter import Jitter
from specdistill.data.render import (
    Face,
    FaceRenderer,
    FaceUnavailable,
    Layout,
    face_names,
    has_ink,
    render_split,
)
from specdistill.errors import SpecdistillError

DEBIAN_PACKAGES = ("fonts-noto-cjk fonts-wqy-zenhei fonts-arphic-ukai fonts-arphic-uming fonts-lxgw-wenkai "
                   "fonts-hanazono fonts-droid-fallback fonts-babelstone-han fonts-arphic-gbsn00lp "
                   "fonts-arphic-gkai00mp")
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")
FONT_SUFFIXES = (".ttf", ".ttc", ".otf", ".otc")
MIN_FILE_BYTES = 1 << 20    # a face with thousands of hanzi is bigger: skips Latin fonts unread
MIN_COVERAGE = 0.9          # share of (a sample of) level 1 a face must draw to count as a CJK face

LAYOUT = Layout(ref_char="国", ref_height=0.76, ref_center_y=0.5, margin=0.04)
JITTER = Jitter(rotate_deg=4.0, scale=(0.92, 1.06), aspect=0.05, shear=0.08, shift=0.04,
                stroke=(-0.5, 0.0, 0.5), ink=(0.65, 1.0), gamma=(0.8, 1.25))
SURVEY_SIZE = 32
MIN_FACE_SHARE = 2 / 3      # a character is kept when this share of every split's faces draw it
PROBES = 48                 # characters compared to find faces that render the same
SAME_MAX_PIXELS = 3         # glyphs differing in at most this many pixels (by > 0.2) are the same...
SAME_SHARE = 0.3            # ...and faces with more than this share of same glyphs are one design
                            # (regional variants share 40%+, distinct designs 15% at most)

_STYLES = (("kai", ("kai",)), ("serif", ("serif", "ming", "sung", "song", "mincho", "hanamin", "babelstone")),
           ("sans", ("sans", "hei", "gothic", "fallback")))
_VARIANT_WORDS = {"bold", "light", "regular", "medium", "book", "mono", "sharp", "sc", "tc", "jp", "kr",
                  "hk", "cn", "tw", "mbe", "gb"}
_SPLIT_PATTERN = ("train", "val", "test", "train", "train", "val", "test", "train")


def gb2312_level1() -> list[str]:
    """The 3755 level-1 characters of GB2312 (rows 16-55; row 55 ends at cell 89), in GB2312 order."""
    chars = []
    for row in range(16, 56):
        for cell in range(1, 95):
            try:
                chars.append(bytes([0xA0 + row, 0xA0 + cell]).decode("gb2312"))
            except UnicodeDecodeError:
                continue
    return chars


def font_files() -> list[Path]:
    """Candidate CJK font files under the usual font folders (symlinks resolved, duplicates removed)."""
    found: dict[Path, None] = {}
    for folder in FONT_DIRS:
        root = Path(folder).expanduser()
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in FONT_SUFFIXES and path.is_file():
                real = path.resolve()
                if real.stat().st_size >= MIN_FILE_BYTES:
                    found.setdefault(real)
    return sorted(found)


def _missing_fonts(detail: str) -> SpecdistillError:
    return SpecdistillError(f"glyphs-hanzi needs CJK fonts ({detail}); install them with: "
                            f"apt-get install {DEBIAN_PACKAGES}")


def discover_faces(chars: list[str], sample: int = 64) -> list[Face]:
    """Faces that draw at least MIN_COVERAGE of an even ``sample`` of ``chars``; faces FreeType cannot
    use are skipped with a warning. (The full cmap is read later, only for the faces kept.)"""
    probe = chars[:: max(1, len(chars) // sample)][:sample]
    faces = []
    for path in font_files():
        try:
            names = face_names(str(path))
        except FaceUnavailable as exc:
            warnings.warn(f"skipping font: {exc}", stacklevel=2)
            continue
        for index, name in enumerate(names):
            face = Face(str(path), index, name)
            try:
                renderer = FaceRenderer(face, LAYOUT, SURVEY_SIZE)
                drawn = has_ink(np.stack([renderer.render(c, check_cmap=False) for c in probe]))
            except FaceUnavailable as exc:
                if "reference character" not in str(exc):   # a font without hanzi is simply not CJK
                    warnings.warn(f"skipping font face: {exc}", stacklevel=2)
                continue
            if drawn.mean() >= MIN_COVERAGE:
                faces.append(face)
    return faces


def style_of(name: str) -> str:
    lower = name.lower()
    for style, words in _STYLES:
        if any(word in lower for word in words):
            return style
    return "other"


def family_of(name: str) -> str:
    """The design a face belongs to: its name without weight, width and region words."""
    words = [w for w in re.split(r"[\s\-_]+", name) if w.lower() not in _VARIANT_WORDS]
    return " ".join(words) or name


def _preference(face: Face) -> tuple:
    # among faces that render the same, keep the simplified-Chinese regional variant
    regional = re.search(r"\b(SC|CN|GB)\b", face.name) is None
    return (regional, "Mono" in face.name, face.name)


def open_renderers(faces: list[Face], canvas: int) -> list[tuple[Face, FaceRenderer]]:
    opened = []
    for face in faces:
        try:
            opened.append((face, FaceRenderer(face, LAYOUT, canvas)))
        except FaceUnavailable as exc:
            warnings.warn(f"skipping font face: {exc}", stacklevel=2)
    return opened


def dedupe_faces(faces: list[Face], probes: list[str]) -> tuple[list[Face], dict[str, str]]:
    """Drop faces that render most ``probes`` like an earlier (preferred) face; returns (kept, dropped->kept)."""
    kept: list[tuple[Face, np.ndarray]] = []
    duplicates: dict[str, str] = {}
    for face, renderer in open_renderers(sorted(faces, key=_preference), SURVEY_SIZE):
        try:
            images = renderer.render_many(probes)
        except FaceUnavailable as exc:
            warnings.warn(f"skipping font face: {exc}", stacklevel=2)
            continue
        for other, other_images in kept:
            differing = (np.abs(images - other_images) > 0.2).reshape(len(probes), -1).sum(1)
            if np.mean(differing <= SAME_MAX_PIXELS) > SAME_SHARE:
                duplicates[face.name] = other.name
                break
        else:
            kept.append((face, images))
    return [face for face, _ in kept], duplicates


def assign_splits(faces: list[Face]) -> dict[str, list[Face]]:
    """Disjoint train/val/test faces; each style's families are dealt out whole, largest to train."""
    splits: dict[str, list[Face]] = {"train": [], "val": [], "test": []}
    by_style: dict[str, dict[str, list[Face]]] = {}
    for face in faces:
        by_style.setdefault(style_of(face.name), {}).setdefault(family_of(face.name), []).append(face)
    for families in by_style.values():
        ordered = sorted(families.items(), key=lambda item: (-len(item[1]), item[0]))
        for i, (_, members) in enumerate(ordered):
            splits[_SPLIT_PATTERN[i % len(_SPLIT_PATTERN)]].extend(members)
    if all(splits.values()):
        return splits
    # too few families for whole-family splits: deal out single faces instead
    splits = {"train": [], "val": [], "test": []}
    for i, face in enumerate(sorted(faces, key=lambda f: (style_of(f.name), f.name))):
        splits[_SPLIT_PATTERN[i % len(_SPLIT_PATTERN)]].append(face)
    return splits


def build_glyphs_hanzi(cfg: DataConfig) -> Dataset:
    level1 = gb2312_level1()
    wanted = cfg.num_classes or 1000
    if not font_files():
        raise _missing_fonts("no font files found under " + ", ".join(FONT_DIRS))
    faces = discover_faces(level1)
    probes = level1[:: len(level1) // PROBES][:PROBES]
    distinct, duplicates = dedupe_faces(faces, probes)
    if len(distinct) < 3:
        raise _missing_fonts(f"found {len(distinct)} distinct CJK faces, need at least 3 for train/val/test")
    splits_faces = assign_splits(distinct)

    # survey characters in GB2312 order until `wanted` are drawn by enough faces of every split
    renderers = {split: open_renderers(fs, SURVEY_SIZE) for split, fs in splits_faces.items()}
    splits_faces = {split: [face for face, _ in rs] for split, rs in renderers.items()}
    chosen: list[str] = []
    drawn_cols: dict[str, list[np.ndarray]] = {split: [] for split in renderers}
    skipped: list[str] = []
    start = 0
    while len(chosen) < wanted and start < len(level1):
        batch = level1[start:start + max(64, wanted - len(chosen) + 16)]
        start += len(batch)
        drawn = {split: np.stack([has_ink(r.render_many(batch)) for _, r in rs]) for split, rs in renderers.items()}
        enough = np.all([d.sum(0) >= np.ceil(MIN_FACE_SHARE * len(d)) for d in drawn.values()], axis=0)
        for j in range(len(batch)):
            if len(chosen) >= wanted:
                break
            if not enough[j]:
                skipped.append(batch[j])
                continue
            chosen.append(batch[j])
            for split in renderers:
                drawn_cols[split].append(drawn[split][:, j])
    if len(chosen) < wanted:
        raise _missing_fonts(f"only {len(chosen)} of {wanted} characters are drawn by enough faces")

    splits = {}
    for s, (split, fs) in enumerate(splits_faces.items()):
        splits[split] = render_split(fs, chosen, np.stack(drawn_cols[split], axis=1), LAYOUT, cfg.image_size,
                                     cfg.copies_per_font, JITTER, [cfg.data_seed, s], desc=f"glyphs-hanzi {split}")
    meta = {
        "faces": {split: [f.name for f in fs] for split, fs in splits_faces.items()},
        "styles": {f.name: style_of(f.name) for fs in splits_faces.values() for f in fs},
        "duplicate_faces": duplicates,
        "skipped_chars": skipped,
        "order": "GB2312 level 1 order (by pinyin; no offline frequency list is available)",
        "copies_per_font": cfg.copies_per_font,
    }
    return Dataset("glyphs-hanzi", chosen, splits["train"], splits["val"], splits["test"], meta)


@DATA_SOURCES.register("glyphs-hanzi")
def load_glyphs_hanzi(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Rendered once into the cache; ``seed`` is unused (``cfg.data_seed`` seeds the jitter)."""
    if (cfg.num_classes or 1000) > len(gb2312_level1()):
        raise SpecdistillError(f"data.num_classes={cfg.num_classes} but GB2312 level 1 has "
                               f"{len(gb2312_level1())} characters; use at most {len(gb2312_level1())}")
    files = font_files()
    if not files:
        raise _missing_fonts("no font files found under " + ", ".join(FONT_DIRS))
    options = {"source": "glyphs-hanzi", "image_size": cfg.image_size, "copies": cfg.copies_per_font,
               "num_classes": cfg.num_classes or 1000, "data_seed": cfg.data_seed,
               "fonts": [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files]}
    return load_or_build(cfg, "glyphs-hanzi", options, lambda: build_glyphs_hanzi(cfg))
