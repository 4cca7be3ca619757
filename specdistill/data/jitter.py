"""Random distortions of rendered glyphs, vectorised with torch (one ``grid_sample`` per batch).

Each high-resolution glyph becomes ``copies`` copies, each with its own rotation, scale, aspect,
shear and shift (one affine map), stroke weight (erosion or dilation) and contrast (ink level and
gamma); area-downsampling to the output size then anti-aliases them. Everything random comes from
a numpy Generator, so a seed gives the same images on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from specdistill.threads import torch_threads


@dataclass(frozen=True)
class Jitter:
    """Random distortions applied to each rendered copy (ranges are uniform)."""

    rotate_deg: float = 6.0
    scale: tuple[float, float] = (0.9, 1.08)
    aspect: float = 0.06             # relative x/y scale difference
    shear: float = 0.12              # tan of the shear angle
    shift: float = 0.06              # fraction of the canvas side
    stroke: tuple[float, ...] = (-0.5, 0.0, 0.5, 1.0)  # erode (<0) / dilate (>0), in high-res pixels
    ink: tuple[float, float] = (0.6, 1.0)     # brightness of the strokes
    gamma: tuple[float, float] = (0.75, 1.35)  # contrast curve


def jitter_copies(base: np.ndarray, copies: int, out_size: int, jitter: Jitter,
                  rng: np.random.Generator, batch: int = 1024) -> np.ndarray:
    """``copies`` distorted copies of each high-resolution glyph, as uint8 [n*copies, out, out].

    Copies of ``base[i]`` occupy rows ``i*copies .. i*copies+copies-1``. All randomness comes
    from ``rng``, so a seed gives the same images on every machine.
    """
    n = len(base)
    out = np.empty((n * copies, out_size, out_size), np.uint8)
    per = max(1, batch // copies)
    # one thread: these small ops gain little from a second one, and on a shared machine OpenMP's
    # spinning threads made them 3-6x slower (measured on a loaded 2-core box)
    with torch_threads(1):
        for start in range(0, n, per):
            chunk = torch.from_numpy(np.ascontiguousarray(base[start:start + per], dtype=np.float32))
            out[start * copies:(start + len(chunk)) * copies] = _jitter_chunk(
                chunk, copies, out_size, jitter, rng)
    return out


def _jitter_chunk(base: torch.Tensor, copies: int, out_size: int, jitter: Jitter,
                  rng: np.random.Generator) -> np.ndarray:
    n, side = base.shape[0], base.shape[-1]
    x = base[:, None]
    m = n * copies
    which = rng.integers(0, len(jitter.stroke), m)
    owner = np.repeat(np.arange(n), copies)
    source = torch.empty((m, 1, side, side))
    for v, radius in enumerate(jitter.stroke):
        pick = np.flatnonzero(which == v)
        if pick.size:
            source[pick] = _stroke(x, radius)[owner[pick]]

    angle = np.deg2rad(rng.uniform(-jitter.rotate_deg, jitter.rotate_deg, m))
    scale = rng.uniform(*jitter.scale, m)
    aspect = np.exp(rng.uniform(-jitter.aspect, jitter.aspect, m))
    shear = rng.uniform(-jitter.shear, jitter.shear, m)
    shift = rng.uniform(-jitter.shift, jitter.shift, (m, 2)) * 2   # normalised coords span 2
    # forward map (glyph -> output): rotation @ shear @ scale; affine_grid wants its inverse
    cos, sin = np.cos(angle), np.sin(angle)
    forward = np.zeros((m, 2, 2))
    forward[:, 0, 0] = cos * scale * aspect
    forward[:, 0, 1] = (cos * shear - sin) * scale / aspect
    forward[:, 1, 0] = sin * scale * aspect
    forward[:, 1, 1] = (sin * shear + cos) * scale / aspect
    inverse = np.linalg.inv(forward)
    theta = np.concatenate([inverse, -inverse @ shift[:, :, None]], axis=2)
    grid = _affine_grid(torch.from_numpy(theta).float(), side)
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    small = F.interpolate(warped, size=(out_size, out_size), mode="area")[:, 0]

    ink = torch.from_numpy(rng.uniform(*jitter.ink, m)).float()[:, None, None]
    gamma = torch.from_numpy(rng.uniform(*jitter.gamma, m)).float()[:, None, None]
    # thin strokes lose brightness when downsampled: stretch each copy to full range first, so
    # that its brightest stroke is exactly `ink` whatever the face's weight and the output size
    small = small.clamp(0, 1) / small.amax(dim=(1, 2), keepdim=True).clamp_min(1e-3)
    small = ink * small.pow(gamma)
    return (small * 255).round().to(torch.uint8).numpy()


def _stroke(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Thicken (radius > 0) or thin (< 0) strokes; a half radius blends with the unchanged glyph, which
    keeps hairlines of light serif faces from vanishing."""
    if radius == 0:
        return x
    whole = int(np.ceil(abs(radius)))
    size = 2 * whole + 1
    moved = (F.max_pool2d(x, size, stride=1, padding=whole) if radius > 0
             else -F.max_pool2d(-x, size, stride=1, padding=whole))
    weight = abs(radius) / whole
    return moved if weight == 1 else torch.lerp(x, moved, weight)


def _affine_grid(theta: torch.Tensor, side: int) -> torch.Tensor:
    """``F.affine_grid(theta, [m, 1, side, side], align_corners=False)``, computed by broadcasting,
    which is several times faster on CPU than the batched matmul torch uses for it."""
    lin = (torch.arange(side, dtype=torch.float32) * 2 + 1) / side - 1
    ys, xs = lin[:, None], lin[None, :]
    grid = torch.empty((theta.shape[0], side, side, 2))
    for k in range(2):
        t = theta[:, k, :, None, None]
        grid[..., k] = t[:, 0] * xs + t[:, 1] * ys + t[:, 2]
    return grid
