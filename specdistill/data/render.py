"""Font rendering shared by the glyph sources (glyphs-latin, glyphs-hanzi).

Two phases, so that choosing characters and faces stays cheap:

1. a *survey* renders every candidate character once per face at a small canvas without jitter;
   it answers "does this face really draw this character?" (cmap entry AND ink AND not the
   .notdef box) and gives the bitmaps that look-alike merging and face de-duplication compare;
2. the chosen characters are rendered once per face at a high resolution (``SUPERSAMPLE`` x the
   output size) and :func:`specdistill.data.jitter.jitter_copies` turns each into ``copies``
   randomly distorted copies (affine, stroke weight, contrast), then area-downsamples them.

Glyphs are placed by the face's metrics, not by each glyph's own box: a reference character fixes
the font size (its ink height becomes a fixed fraction of the canvas, so faces with different
em-to-cap ratios agree) and the vertical position (its ink centre sits at a fixed row). Relative
size and baseline therefore survive: ``o`` stays smaller and lower than ``O``, ``p`` keeps its
descender. Each glyph is centred horizontally on its own ink.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from specdistill.data import Split
from specdistill.data.jitter import Jitter, jitter_copies

SUPERSAMPLE = 2          # glyphs are drawn and distorted at 2 x the output size, then area-downsampled
INK_LEVEL = 0.3          # a pixel counts as ink above this (images in [0, 1])
_NOTDEF_PROBE = "\U000ffffd"  # private-use plane 15: no text font maps it, so it draws .notdef


@dataclass(frozen=True)
class Face:
    """One face of a font file (a .ttc collection holds several, addressed by ``index``)."""

    path: str
    index: int = 0
    name: str = ""

    def label(self) -> str:
        return self.name or f"{Path(self.path).name}#{self.index}"


@dataclass(frozen=True)
class Layout:
    """Where glyphs sit on the canvas, as fractions of its side."""

    ref_char: str           # its ink height fixes the font size, its ink centre the baseline
    ref_height: float       # ink height of ref_char
    ref_center_y: float     # row of ref_char's ink centre
    margin: float = 0.04    # a glyph that would cross this margin is shrunk to fit


class FaceUnavailable(Exception):
    """FreeType cannot open or draw this face; callers skip it with a warning."""


@functools.lru_cache(maxsize=256)
def font_cmap(path: str, index: int = 0) -> frozenset[int]:
    """Code points the face's cmap claims, as FreeType reads them (through matplotlib's FT2Font, which
    lists a big CJK cmap in milliseconds; fontTools, 100x slower there, is the fallback)."""
    try:
        from matplotlib.ft2font import FT2Font

        return frozenset(FT2Font(path, face_index=index).get_charmap())
    except TypeError:   # matplotlib < 3.10 has no face_index
        pass
    except (OSError, RuntimeError, ValueError) as exc:
        raise FaceUnavailable(f"{path}#{index}: FreeType cannot read the cmap ({exc})") from None
    from fontTools.ttLib import TTFont

    try:
        with TTFont(path, fontNumber=index, lazy=True) as font:
            return frozenset((font.getBestCmap() or {}).keys())
    except Exception as exc:  # fontTools raises many types on a broken file
        raise FaceUnavailable(f"{path}#{index}: cannot read cmap ({exc})") from None


def face_names(path: str) -> list[str]:
    """Full names of the faces in a font file (one per index of a collection)."""
    from fontTools.ttLib import TTCollection, TTFont

    try:
        if path.lower().endswith((".ttc", ".otc")):
            fonts = TTCollection(path, lazy=True).fonts
        else:
            fonts = [TTFont(path, lazy=True)]
        return [font["name"].getDebugName(4) or f"{Path(path).name}#{i}" for i, font in enumerate(fonts)]
    except Exception as exc:
        raise FaceUnavailable(f"{path}: cannot read font names ({exc})") from None


class FaceRenderer:
    """Draws single characters of one face onto a square canvas, placed by :class:`Layout`."""

    def __init__(self, face: Face, layout: Layout, canvas: int) -> None:
        self.face, self.layout, self.canvas = face, layout, canvas
        try:
            probe = self._font(200)
            top, bottom = self._ink_rows(probe, layout.ref_char)
            size = max(4, round(200 * layout.ref_height * canvas / max(bottom - top, 1)))
            self.size = size
            top, bottom = self._ink_rows(self._font(size), layout.ref_char)
        except OSError as exc:
            raise FaceUnavailable(f"{face.label()}: FreeType error ({exc})") from None
        # baseline row such that the reference glyph's ink centre lands on ref_center_y
        self.baseline = layout.ref_center_y * canvas - (top + bottom) / 2
        self._notdef = self._draw(_NOTDEF_PROBE)

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a few sizes per renderer, renderer-lifetime cache
    def _font(self, size: int) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(self.face.path, size=size, index=self.face.index,
                                  layout_engine=ImageFont.Layout.BASIC)

    @staticmethod
    def _ink_rows(font: ImageFont.FreeTypeFont, char: str) -> tuple[int, int]:
        """Top and bottom (exclusive) ink rows of ``char`` relative to its baseline."""
        image, baseline = _draw_on(font, char)
        rows = np.flatnonzero(image.max(axis=1) > INK_LEVEL * 255)
        if rows.size == 0:
            raise OSError(f"reference character {char!r} has no ink")
        return int(rows[0]) - baseline, int(rows[-1]) + 1 - baseline

    def _draw(self, char: str) -> np.ndarray:
        """Render ``char`` as float32 [canvas, canvas], shrunk about the reference centre if it would
        cross the margin (wide letters such as Ш, tall stacked accents)."""
        canvas = self.canvas
        centre = self.layout.ref_center_y * canvas
        margin = self.layout.margin * canvas
        size = self.size
        for _ in range(3):
            baseline = centre + (self.baseline - centre) * (size / self.size)
            image, origin = _draw_on(self._font(size), char)
            rows = np.flatnonzero(image.max(axis=1) > 0)
            cols = np.flatnonzero(image.max(axis=0) > 0)
            if rows.size == 0:
                return np.zeros((canvas, canvas), np.float32)
            top = baseline + rows[0] - origin
            bottom = baseline + rows[-1] + 1 - origin
            width = cols[-1] + 1 - cols[0]
            scale = min(1.0, (canvas - 2 * margin) / width)
            if top < margin:
                scale = min(scale, (centre - margin) / (centre - top))
            if bottom > canvas - margin:
                scale = min(scale, (canvas - margin - centre) / (bottom - centre))
            if scale >= 1.0 or size <= 2:
                break
            size = max(2, int(size * scale))
        out = np.zeros((canvas, canvas), np.float32)
        dx = int(round(canvas / 2 - (cols[0] + cols[-1] + 1) / 2))
        dy = int(round(baseline - origin))
        _paste(out, image.astype(np.float32) / 255.0, dy, dx)
        return out

    @functools.cached_property
    def cmap(self) -> frozenset[int]:
        return font_cmap(self.face.path, self.face.index)

    def render(self, char: str, check_cmap: bool = True) -> np.ndarray:
        """The glyph as float32 [canvas, canvas] in [0, 1]; all zeros when the face lacks it.

        ``check_cmap=False`` skips reading the cmap (slow for big CJK fonts) and relies on the
        .notdef comparison alone: good enough for a quick coverage estimate.
        """
        if check_cmap and ord(char) not in self.cmap:
            return np.zeros((self.canvas, self.canvas), np.float32)
        try:
            out = self._draw(char)
        except OSError as exc:
            raise FaceUnavailable(f"{self.face.label()}: FreeType error on {char!r} ({exc})") from None
        if self._notdef.max() > 0 and np.array_equal(out, self._notdef):
            return np.zeros_like(out)
        return out

    def render_many(self, chars: list[str]) -> np.ndarray:
        out = np.zeros((len(chars), self.canvas, self.canvas), np.float32)
        for i, char in enumerate(chars):
            out[i] = self.render(char)
        return out


def _draw_on(font: ImageFont.FreeTypeFont, char: str) -> tuple[np.ndarray, int]:
    """Draw ``char`` on a scratch image big enough for any glyph; returns (uint8 image, baseline row)."""
    size = int(font.size)
    image = Image.new("L", (4 * size, 4 * size), 0)
    ImageDraw.Draw(image).text((size, 2 * size), char, font=font, fill=255, anchor="ls")
    return np.asarray(image), 2 * size


def _paste(out: np.ndarray, image: np.ndarray, dy: int, dx: int) -> None:
    """out[dy:dy+h, dx:dx+w] = image, clipped to ``out``."""
    h, w = image.shape
    H, W = out.shape
    y0, x0 = max(dy, 0), max(dx, 0)
    y1, x1 = min(dy + h, H), min(dx + w, W)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = image[y0 - dy:y1 - dy, x0 - dx:x1 - dx]


def has_ink(images: np.ndarray, min_pixels: int = 2) -> np.ndarray:
    """Per image: at least ``min_pixels`` pixels brighter than INK_LEVEL (float [0,1] or uint8)."""
    level = INK_LEVEL * (255 if images.dtype == np.uint8 else 1.0)
    return (images.reshape(len(images), -1) > level).sum(axis=1) >= min_pixels


def render_split(faces: list[Face], chars: list[str], drawn: np.ndarray, layout: Layout, image_size: int,
                 copies: int, jitter: Jitter, seed: int | list[int], desc: str = "render") -> Split:
    """Render class ``i`` (drawn as ``chars[i]``) from every face that draws it, ``copies`` times each.

    ``drawn[f, i]`` (from the survey) says whether face ``f`` draws ``chars[i]``; a glyph that has no
    ink at high resolution is an error, because the survey promised it.
    """
    from tqdm import tqdm

    total = int(drawn.sum()) * copies
    images = np.empty((total, image_size, image_size), np.uint8)
    labels = np.empty(total, np.int64)
    at = 0
    with tqdm(total=int(drawn.sum()), desc=desc, unit="glyph", leave=False) as bar:
        for f, face in enumerate(faces):
            ids = np.flatnonzero(drawn[f])
            if ids.size == 0:
                continue
            renderer = FaceRenderer(face, layout, image_size * SUPERSAMPLE)
            base = renderer.render_many([chars[i] for i in ids])
            empty = ~has_ink(base)
            if empty.any():
                raise RuntimeError(f"{face.label()} drew no ink for {[chars[i] for i in ids[empty]]} at high "
                                   "resolution although the survey found ink")
            rng = np.random.default_rng(np.atleast_1d(seed).tolist() + [f])
            n = ids.size * copies
            images[at:at + n] = jitter_copies(base, copies, image_size, jitter, rng)
            labels[at:at + n] = np.repeat(ids, copies)
            at += n
            bar.update(ids.size)
    return Split(images, labels)
