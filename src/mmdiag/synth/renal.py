"""Renal biopsy micrographs (OM, IM, TEM) carrying a planted, partial class signal.

The demo task of CMUS-Net is to tell three glomerular diseases apart: IgA nephropathy
(``IgAN``), membranous nephropathy (``MN``, staged I–III) and lupus nephritis (``LN``).
Each modality alone carries partial, *different* information, so that fusing modalities
beats any single one.

Planted signal
--------------
* **Reliability.** Per patient and modality ``m``, with probability
  ``modality_reliability[m]`` the modality shows the patient's true disease pattern;
  otherwise it shows the pattern of a different class drawn uniformly (independently
  across modalities). :func:`draw_shown_pattern` implements this.
* **IM** (immunofluorescence, FITC green on black): IgAN = coarse granular *mesangial*
  staining (bright blobs in the glomerulus centre); MN = fine granular staining along the
  *capillary walls* (thin bright rings/loops); LN = both ("full house").
* **TEM** (electron micrograph, 8-bit grey, legend strip at the bottom): electron-dense
  deposits (dark blobs) in the *mesangium* (IgAN, lower part of the field, below the
  capillary lumen), *subepithelial* along the outer side of the glomerular basement
  membrane (MN; deposit size and membrane thickness grow with stage I → III), or both
  (LN). Per image, with probability :data:`EMPTY_TEM_PROBABILITY` no deposit is cut, and
  the number of deposits varies, so single images are noisy and the bag carries the signal.
* **OM** (PASM-like light micrograph: silver-black basement membranes on pale pink):
  IgAN = mesangial expansion (large dark central matrix, thin loops); MN = thickened
  silver capillary loops with spikes and little matrix; LN = hypercellular tuft (many
  nuclei) with magenta "wire-loop" thickening of the capillary walls.

Every image is jittered (glomerulus position, size, rotation, loop count, noise), so a
classifier must learn the pattern rather than a template. Signals planted in the other
modalities (WSI nuclear density, CT lesion size, genes, survival) are described in
:mod:`mmdiag.synth.wsi`, :mod:`mmdiag.synth.volumes` and :mod:`mmdiag.synth.tables`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmdiag.synth._draw import blend, impulse_blobs, smooth_noise, soft_step, to_uint8

DISEASES = ("IgAN", "MN", "LN")
MN_STAGES = ("I", "II", "III")
EMPTY_TEM_PROBABILITY = 0.15

SIGNAL_DESCRIPTION = {
    "reliability": (
        "per patient and modality, with probability modality_reliability[m] the modality "
        "shows the true disease pattern, otherwise that of a different class drawn "
        "uniformly; independent across modalities"
    ),
    "IM": "IgAN: granular mesangial blobs at the glomerulus centre; MN: fine granular "
    "staining along capillary loops (rings); LN: both",
    "TEM": "electron-dense deposits: IgAN mesangial (lower field), MN subepithelial along "
    "the outer basement membrane (size and membrane thickness grow with stage I-III), "
    f"LN both; each image has no deposit with probability {EMPTY_TEM_PROBABILITY}",
    "OM": "IgAN: mesangial expansion (large dark central matrix); MN: thick silver "
    "capillary loops with spikes; LN: hypercellular tuft with magenta wire loops",
    "WSI": "nuclear density of the tissue depends on the disease (LN > IgAN > MN)",
    "CT": "lesion radius depends on the disease (IgAN small, MN medium, LN large)",
    "genes": "survival hazard = disease baseline x exp(risk), risk from the mean z-scored "
    "tumour gene set; microenvironment genes shift with disease",
}


def draw_shown_pattern(rng: np.random.Generator, disease: str, reliability: float) -> str:
    """Return the class whose pattern a modality shows for a patient with ``disease``."""
    if rng.random() < reliability:
        return disease
    others = [name for name in DISEASES if name != disease]
    return others[int(rng.integers(len(others)))]


@dataclass(frozen=True)
class Glomerulus:
    """Geometry of one glomerulus in pixel coordinates (capillary loops as circles)."""

    centre_x: float
    centre_y: float
    radius_px: float
    loop_x: np.ndarray
    loop_y: np.ndarray
    loop_radius_px: np.ndarray


def random_glomerulus(rng: np.random.Generator, width_px: int, height_px: int) -> Glomerulus:
    """Place a glomerulus with jittered position, size, rotation and loop count."""
    radius = min(width_px, height_px) * rng.uniform(0.33, 0.41)
    margin = 1.12 * radius

    def _centre(extent: int) -> float:
        if extent > 2 * margin:
            return float(rng.uniform(margin, extent - margin))
        return extent / 2.0

    centre_x, centre_y = _centre(width_px), _centre(height_px)
    n_loops = int(rng.integers(7, 11))
    angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(n_loops) / n_loops
    angles = angles + rng.normal(0.0, 0.12, n_loops)
    distance = radius * rng.uniform(0.56, 0.64, n_loops)
    return Glomerulus(
        centre_x=centre_x,
        centre_y=centre_y,
        radius_px=float(radius),
        loop_x=centre_x + distance * np.cos(angles),
        loop_y=centre_y + distance * np.sin(angles),
        loop_radius_px=radius * rng.uniform(0.17, 0.23, n_loops),
    )


def _grid(height_px: int, width_px: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height_px, 0:width_px]
    return yy.astype(np.float32), xx.astype(np.float32)


def _loop_fields(glom: Glomerulus, yy: np.ndarray, xx: np.ndarray, spike_count: int = 0):
    """Signed distance to the nearest loop wall centre line, and spike phase there.

    Returns ``(ring_offset, spike)`` where ``ring_offset`` is distance-to-centre minus the
    loop radius of the nearest loop (negative inside a lumen), and ``spike`` is
    ``cos(spike_count * angle)`` around that loop.
    """
    ring_offset = np.full(yy.shape, np.inf, np.float32)
    spike = np.zeros(yy.shape, np.float32)
    for lx, ly, lr in zip(glom.loop_x, glom.loop_y, glom.loop_radius_px, strict=True):
        dx, dy = xx - np.float32(lx), yy - np.float32(ly)
        offset = np.hypot(dx, dy) - np.float32(lr)
        closer = np.abs(offset) < np.abs(ring_offset)
        ring_offset = np.where(closer, offset, ring_offset)
        if spike_count:
            spike = np.where(closer, np.cos(spike_count * np.arctan2(dy, dx)), spike)
    return ring_offset, spike


def render_om(rng: np.random.Generator, pattern: str, width_px: int, height_px: int) -> np.ndarray:
    """Render a PASM-like optical micrograph showing ``pattern``; returns uint8 (H, W, 3)."""
    _check_pattern(pattern)
    glom = random_glomerulus(rng, width_px, height_px)
    yy, xx = _grid(height_px, width_px)
    radius = glom.radius_px
    r = np.hypot(xx - glom.centre_x, yy - glom.centre_y)
    edge = max(radius * 0.01, 0.6)

    texture = smooth_noise(rng, height_px, width_px, max(radius * 0.08, 2.0))
    image = np.empty((height_px, width_px, 3), np.float32)
    image[:] = (238.0, 210.0, 208.0)
    image += 6.0 * texture[..., None]
    # Tubular basement membranes of the interstitium: thin silver contour lines of noise.
    tubules = smooth_noise(rng, height_px, width_px, max(radius * 0.45, 4.0))
    image = blend(image, (80, 70, 70), 0.55 * np.exp(-(tubules**2) / 0.012))

    capsule_r = 1.08 * radius
    image = blend(image, (248, 240, 238), soft_step(r - capsule_r, edge))  # Bowman's space
    image = blend(image, (45, 40, 42), 0.9 * soft_step(np.abs(r - capsule_r) - 0.02 * radius))
    wobble = 1.0 + 0.05 * smooth_noise(rng, height_px, width_px, max(radius * 0.3, 2.0))
    tuft = soft_step(r - 0.9 * radius * wobble, edge)
    image = blend(image, (226, 178, 190), tuft)

    wall_px = {"IgAN": 0.035, "MN": 0.085, "LN": 0.10}[pattern] * radius
    ring_offset, spike = _loop_fields(glom, yy, xx, spike_count=14 if pattern == "MN" else 0)
    image = blend(image, (250, 238, 238), soft_step(ring_offset + wall_px / 2, edge))  # lumen
    wall = soft_step(np.abs(ring_offset) - wall_px / 2, edge)
    if pattern == "MN":
        spike_len = 0.07 * radius
        outside = (ring_offset > 0) & (ring_offset < wall_px / 2 + spike_len)
        wall = np.maximum(wall, np.where(outside & (spike > 0.55), 1.0, 0.0).astype(np.float32))
    wall_colour = (150, 40, 95) if pattern == "LN" else (38, 32, 34)
    image = blend(image, wall_colour, 0.95 * wall * tuft)

    mesangium_r = {"IgAN": 0.48, "MN": 0.15, "LN": 0.22}[pattern] * radius
    lobes = 1.0 + 0.22 * smooth_noise(rng, height_px, width_px, max(radius * 0.15, 2.0))
    image = blend(image, (70, 58, 64), 0.9 * soft_step(r - mesangium_r * lobes, edge))

    n_nuclei = {"IgAN": 35, "MN": 20, "LN": 130}[pattern]
    nucleus_r = radius * 0.85 * np.sqrt(rng.uniform(0, 1, n_nuclei))
    nucleus_a = rng.uniform(0, 2 * np.pi, n_nuclei)
    nuclei = impulse_blobs(
        (height_px, width_px),
        glom.centre_y + nucleus_r * np.sin(nucleus_a),
        glom.centre_x + nucleus_r * np.cos(nucleus_a),
        sigma_px=max(radius * 0.022, 0.7),
        weights=rng.uniform(0.8, 1.3, n_nuclei),
    )
    image = blend(image, (90, 55, 125), np.clip(1.6 * nuclei, 0, 0.95))

    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)
    return to_uint8(image)


def render_im(rng: np.random.Generator, pattern: str, width_px: int, height_px: int) -> np.ndarray:
    """Render an immunofluorescence (FITC) micrograph showing ``pattern``; uint8 (H, W, 3)."""
    _check_pattern(pattern)
    glom = random_glomerulus(rng, width_px, height_px)
    yy, xx = _grid(height_px, width_px)
    radius = glom.radius_px
    r = np.hypot(xx - glom.centre_x, yy - glom.centre_y)
    shape = (height_px, width_px)

    # Faint autofluorescence of the tuft and capsule, so the glomerulus is findable.
    stain = 0.07 * soft_step(r - 0.9 * radius, max(radius * 0.02, 0.6))
    stain += 0.05 * soft_step(np.abs(r - 1.08 * radius) - 0.015 * radius)
    stain += 0.02 * smooth_noise(rng, *shape, max(radius * 0.1, 2.0))

    if pattern in ("IgAN", "LN"):  # coarse granular mesangial deposits
        n = 70 if pattern == "IgAN" else 50
        dist = np.minimum(np.abs(rng.normal(0.0, 0.2 * radius, n)), 0.42 * radius)
        angle = rng.uniform(0, 2 * np.pi, n)
        stain += impulse_blobs(
            shape,
            glom.centre_y + dist * np.sin(angle),
            glom.centre_x + dist * np.cos(angle),
            sigma_px=max(radius * 0.045, 0.8),
            weights=rng.uniform(0.5, 1.0, n),
        )
    if pattern in ("MN", "LN"):  # fine granular staining along the capillary walls
        per_loop = 45 if pattern == "MN" else 35
        ys, xs = [], []
        for lx, ly, lr in zip(glom.loop_x, glom.loop_y, glom.loop_radius_px, strict=True):
            angle = rng.uniform(0, 2 * np.pi, per_loop)
            jitter = rng.normal(0.0, 0.012 * radius, per_loop)
            ys.append(ly + (lr + jitter) * np.sin(angle))
            xs.append(lx + (lr + jitter) * np.cos(angle))
        ys, xs = np.concatenate(ys), np.concatenate(xs)
        stain += impulse_blobs(
            shape,
            ys,
            xs,
            sigma_px=max(radius * 0.02, 0.6),
            weights=rng.uniform(0.5, 1.0, ys.size),
        )

    green = 8.0 + 240.0 * (1.0 - np.exp(-2.2 * np.clip(stain, 0, None)))
    image = np.stack([0.3 * green, green, 0.12 * green], axis=-1)
    image += rng.normal(0.0, 2.5, image.shape).astype(np.float32)
    return to_uint8(image)


def render_tem(
    rng: np.random.Generator,
    pattern: str,
    size_px: int,
    legend_px: int,
    *,
    mn_stage: str = "II",
) -> np.ndarray:
    """Render one TEM image (uint8, ``size_px`` square) with a legend strip at the bottom.

    ``mn_stage`` sets subepithelial deposit size and membrane thickness when ``pattern``
    shows MN deposits (``"MN"`` or ``"LN"``).
    """
    _check_pattern(pattern)
    if mn_stage not in MN_STAGES:
        raise ValueError(f"mn_stage must be one of {MN_STAGES}, got {mn_stage!r}")
    if not 0 <= legend_px < size_px:
        raise ValueError(f"legend_px must be in [0, size_px), got {legend_px!r}")
    s = float(size_px)
    field_h = size_px - legend_px
    yy, xx = _grid(size_px, size_px)
    centre_x = s / 2 + rng.uniform(-0.06, 0.06) * s
    centre_y = field_h / 2 + rng.uniform(-0.04, 0.04) * s
    angle = rng.uniform(-0.35, 0.35)
    flip = 1.0 if rng.random() < 0.5 else -1.0
    # (u, v): u along the basement membrane, v across it (v < 0 towards the urinary space).
    u = flip * ((xx - centre_x) * np.cos(angle) + (yy - centre_y) * np.sin(angle))
    v = -(xx - centre_x) * np.sin(angle) + (yy - centre_y) * np.cos(angle)

    stage_index = MN_STAGES.index(mn_stage)
    subepithelial = pattern in ("MN", "LN")
    mesangial = pattern in ("IgAN", "LN")
    thick = 0.04 * s * (1.0 + (0.35 * stage_index if subepithelial else 0.0))
    phase = rng.uniform(0, 2 * np.pi)
    wavelength = rng.uniform(0.7, 1.1) * s

    def gbm_centre(along):
        return -0.14 * s + 0.04 * s * np.sin(2 * np.pi * along / wavelength + phase)

    gbm_v = gbm_centre(u)
    image = 190.0 + 8.0 * smooth_noise(rng, size_px, size_px, max(0.06 * s, 2.0))
    foot = 0.03 * s * (np.sin(2 * np.pi * u / (0.06 * s)) > 0)  # podocyte foot processes
    image = np.where((v < gbm_v - thick / 2) & (v > gbm_v - thick / 2 - foot), 125.0, image)
    image = np.where(np.abs(v - gbm_v) < thick / 2, 95.0, image)  # basement membrane
    endothelium = np.abs(v - (gbm_v + thick / 2 + 0.02 * s)) < 0.007 * s
    image = np.where(endothelium, 130.0, image)
    mesangium_top = 0.13 * s + 0.03 * s * smooth_noise(rng, size_px, size_px, max(0.2 * s, 2.0))
    matrix = 145.0 + 14.0 * smooth_noise(rng, size_px, size_px, max(0.015 * s, 1.5))
    image = np.where(v > mesangium_top, matrix, image)
    image = image.astype(np.float32)

    if rng.random() >= EMPTY_TEM_PROBABILITY:
        deposits: list[tuple[float, float, float]] = []  # (u, v, radius)
        if subepithelial:
            radius = 0.019 * s * (1.0, 1.5, 2.0)[stage_index]
            for du in rng.uniform(-0.7 * s, 0.7 * s, int(rng.integers(7, 13))):
                r = radius * rng.uniform(0.8, 1.2)
                deposits.append((du, gbm_centre(du) - thick / 2 - 0.2 * r, r))
        if mesangial:
            for _ in range(int(rng.integers(4, 8))):
                deposits.append(
                    (
                        rng.uniform(-0.4 * s, 0.4 * s),
                        rng.uniform(0.2, 0.34) * s,
                        rng.uniform(0.03, 0.05) * s,
                    )
                )
        roughness = smooth_noise(rng, size_px, size_px, max(0.01 * s, 1.0))
        dense = np.zeros_like(image)
        for du, dv, r in deposits:
            # Only the deposit's bounding box is evaluated: (u, v) -> pixel centre.
            px = centre_x + flip * du * np.cos(angle) - dv * np.sin(angle)
            py = centre_y + flip * du * np.sin(angle) + dv * np.cos(angle)
            half = 1.3 * r + 2
            rows = slice(max(0, int(py - half)), max(0, min(size_px, int(py + half) + 1)))
            cols = slice(max(0, int(px - half)), max(0, min(size_px, int(px + half) + 1)))
            if rows.start >= rows.stop or cols.start >= cols.stop:
                continue
            box_u, box_v = u[rows, cols], v[rows, cols]
            dist = np.sqrt(((box_u - du) / r) ** 2 + ((box_v - dv) / (0.7 * r)) ** 2)
            blob = soft_step(dist - 1.0 + 0.12 * roughness[rows, cols], 0.05)
            np.maximum(dense[rows, cols], blob, out=dense[rows, cols])
        image = image * (1.0 - dense) + 30.0 * dense

    image += rng.normal(0.0, 6.0, image.shape).astype(np.float32)
    tem = to_uint8(image, 12.0, 243.0)  # the legend alone uses pure 0 and 255
    _draw_legend(rng, tem, legend_px)
    return tem


def _draw_legend(rng: np.random.Generator, tem: np.ndarray, legend_px: int) -> None:
    """Write a white legend strip with a black scale bar and text-like marks, in place."""
    if legend_px == 0:
        return
    size_px = tem.shape[1]
    legend = tem[-legend_px:]
    legend[:] = 255
    legend[0] = 0  # frame line between micrograph and legend
    bar_h = max(1, legend_px // 4)
    bar_top = (legend_px - bar_h) // 2 + 1
    bar_left = int(0.05 * size_px)
    bar_len = int(rng.choice([0.15, 0.2, 0.25]) * size_px)
    legend[bar_top : min(legend_px, bar_top + bar_h), bar_left : bar_left + bar_len] = 0
    glyph_h = max(1, legend_px // 2)
    glyph_top = (legend_px - glyph_h) // 2 + 1
    x = int(0.55 * size_px)
    for _ in range(8):  # "2 µm  HV=80kV"-like glyphs
        width = max(1, int(rng.uniform(0.01, 0.025) * size_px))
        if x + width >= size_px - 1:
            break
        legend[glyph_top : min(legend_px, glyph_top + glyph_h), x : x + width] = 0
        x += width + max(1, int(0.012 * size_px))


def _check_pattern(pattern: str) -> None:
    if pattern not in DISEASES:
        raise ValueError(f"pattern must be one of {DISEASES}, got {pattern!r}")
