"""SimSiam's augmentations, applied to a whole batch at once on the training device.

The data loader only decodes uint8 patches; every random transform runs here, batched, on the
GPU when there is one, so augmenting never becomes the bottleneck of pretraining. Each image
draws its own parameters (Chen & He 2021, Sec. 4 / MoCo v2 recipe):

- random resized crop, area scale ``crop_scale`` (0.2-1), aspect ratio 3/4-4/3;
- horizontal flip p 0.5 (and vertical flip p 0.5 for pathology, where "up" means nothing);
- colour jitter (brightness, contrast, saturation 0.4, hue 0.1) with p 0.8, the four
  adjustments in a random order per image as torchvision's ``ColorJitter`` does;
- grayscale p 0.2; Gaussian blur with sigma in [0.1, 2.0] with p 0.5;
- normalisation by ``mean``/``std``.

Parameters are drawn on the CPU from a ``torch.Generator`` for the *global* batch
(:func:`sample_view_params`), so every process of a data-parallel job draws the same numbers
and takes its own rows: results do not depend on the number of processes. The pixel operations
follow torchvision's definitions (tested against ``torchvision.transforms.v2.functional``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass(frozen=True)
class AugmentSettings:
    """``ssl.augment`` of the config (SimSiam's defaults)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    vflip: bool = True
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1  # kernel side / image side, odd (23 px at 224 px)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_config(cls, settings: dict) -> AugmentSettings:
        return cls(**{key: tuple(v) if isinstance(v, list) else v for key, v in settings.items()})


@dataclass
class ViewParams:
    """Per-image random parameters of one augmented view of a batch (all CPU tensors)."""

    crop: torch.Tensor  # (B, 4) float: left, top, width, height in input pixels
    hflip: torch.Tensor  # (B,) bool
    vflip: torch.Tensor  # (B,) bool
    jitter: torch.Tensor  # (B,) bool: colour jitter applied
    factors: torch.Tensor  # (B, 4) brightness, contrast, saturation factors and hue shift
    order: torch.Tensor  # (B, 4) long: the order of the four adjustments
    grayscale: torch.Tensor  # (B,) bool
    blur: torch.Tensor  # (B,) bool
    sigma: torch.Tensor  # (B,) float

    def rows(self, index: torch.Tensor | slice) -> ViewParams:
        """The parameters of a subset of the batch (a rank's share)."""
        return ViewParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def sample_crops(
    n: int, height: int, width: int, settings: AugmentSettings, generator: torch.Generator
) -> torch.Tensor:
    """Random resized crop boxes (left, top, width, height), torchvision's algorithm per row:
    ten tries of area and aspect ratio, the first that fits wins, else a central crop."""
    tries = 10
    area = height * width
    target = area * _uniform(n * tries, *settings.crop_scale, generator).view(n, tries)
    log_ratio = _uniform(n * tries, *map(math.log, settings.crop_ratio), generator)
    aspect = log_ratio.exp().view(n, tries)
    crop_w = (target * aspect).sqrt().round()
    crop_h = (target / aspect).sqrt().round()
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), -1)
    pick = first.clamp(min=0).unsqueeze(1)
    crop_w, crop_h = crop_w.gather(1, pick).squeeze(1), crop_h.gather(1, pick).squeeze(1)
    top = (torch.rand(n, generator=generator, dtype=torch.float64) * (height - crop_h + 1)).floor()
    left = (torch.rand(n, generator=generator, dtype=torch.float64) * (width - crop_w + 1)).floor()
    fallback = _central_crop(height, width, settings.crop_ratio)
    boxes = torch.stack([left, top, crop_w, crop_h], dim=1)
    boxes[first < 0] = torch.tensor(fallback, dtype=torch.float64)
    return boxes.float()


def _central_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, ...]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return ((width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h)


def sample_view_params(
    n: int, height: int, width: int, settings: AugmentSettings, generator: torch.Generator
) -> ViewParams:
    """Draw one view's parameters for ``n`` images of ``height`` x ``width`` pixels."""

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < p

    crop = sample_crops(n, height, width, settings, generator)
    brightness, contrast, saturation, hue = settings.jitter
    factors = torch.stack(
        [
            _uniform(n, max(0.0, 1 - brightness), 1 + brightness, generator),
            _uniform(n, max(0.0, 1 - contrast), 1 + contrast, generator),
            _uniform(n, max(0.0, 1 - saturation), 1 + saturation, generator),
            _uniform(n, -hue, hue, generator),
        ],
        dim=1,
    ).float()
    order = torch.rand(n, 4, generator=generator).argsort(dim=1)
    return ViewParams(
        crop=crop,
        hflip=coin(0.5) & settings.hflip,
        vflip=coin(0.5) & settings.vflip,
        jitter=coin(settings.jitter_p),
        factors=factors,
        order=order,
        grayscale=coin(settings.grayscale_p),
        blur=coin(settings.blur_p),
        sigma=_uniform(n, *settings.blur_sigma, generator).float(),
    )


def resized_crop(
    images: torch.Tensor, crop: torch.Tensor, out_px: int, hflip=None, vflip=None
) -> torch.Tensor:
    """Crop each image to its box and resize it bilinearly to ``out_px`` (flips optional).

    Sampling positions are those of ``interpolate(..., align_corners=False)`` on the crop, so a
    crop equals torchvision's ``resized_crop(antialias=False)`` away from the crop's border.
    """
    n, _, height, width = images.shape
    crop = crop.to(images.device, torch.float32)
    left, top, crop_w, crop_h = crop.unbind(1)
    # Input-pixel centre x of output column u: left + (u + 0.5) * crop_w / out - 0.5, mapped to
    # grid_sample's normalised [-1, 1] (align_corners=False): g = (2x + 1) / width - 1.
    scale_x, scale_y = crop_w / width, crop_h / height
    shift_x = (2 * left + crop_w) / width - 1
    shift_y = (2 * top + crop_h) / height - 1
    if hflip is not None:
        scale_x = torch.where(hflip.to(images.device), -scale_x, scale_x)
    if vflip is not None:
        scale_y = torch.where(vflip.to(images.device), -scale_y, scale_y)
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = scale_x, shift_x
    theta[:, 1, 1], theta[:, 1, 2] = scale_y, shift_y
    grid = F.affine_grid(theta, [n, 3, out_px, out_px], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) of RGB images in [0, 1]."""
    weights = torch.tensor(GRAY_WEIGHTS, device=images.device, dtype=images.dtype)
    return (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _per_image(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_image(factor)).clamp(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    factor = _per_image(factor)
    return (factor * images + (1 - factor) * mean).clamp(0, 1)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = _per_image(factor)
    return (factor * images + (1 - factor) * grayscale(images)).clamp(0, 1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by ``shift`` turns (-0.5..0.5), via HSV."""
    hue, saturation, value = _rgb_to_hsv(images)
    hue = torch.remainder(hue + _per_image(shift), 1.0)
    return _hsv_to_rgb(hue, saturation, value)


def _rgb_to_hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    red, green, blue = images.unbind(1)
    maximum, _ = images.max(1)
    minimum, _ = images.min(1)
    chroma = maximum - minimum
    equal = maximum == minimum
    saturation = chroma / torch.where(equal, torch.ones_like(maximum), maximum)
    safe_chroma = torch.where(equal, torch.ones_like(chroma), chroma)
    red_part = (maximum - red) / safe_chroma
    green_part = (maximum - green) / safe_chroma
    blue_part = (maximum - blue) / safe_chroma
    hue_r = (maximum == red) * (blue_part - green_part)
    hue_g = ((maximum == green) & (maximum != red)) * (2.0 + red_part - blue_part)
    hue_b = ((maximum != green) & (maximum != red)) * (4.0 + green_part - red_part)
    hue = torch.remainder((hue_r + hue_g + hue_b) / 6.0 + 1.0, 1.0)
    return hue.unsqueeze(1), saturation.unsqueeze(1), maximum.unsqueeze(1)


def _hsv_to_rgb(hue, saturation, value) -> torch.Tensor:
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.long() % 6
    p = (value * (1.0 - saturation)).clamp(0, 1)
    q = (value * (1.0 - saturation * fraction)).clamp(0, 1)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0, 1)
    # Rows: sector 0..5; columns: which of (v, q, p, t) is red, green, blue.
    table = torch.stack(
        [
            torch.cat([value, t, p], 1),
            torch.cat([q, value, p], 1),
            torch.cat([p, value, t], 1),
            torch.cat([p, q, value], 1),
            torch.cat([t, p, value], 1),
            torch.cat([value, p, q], 1),
        ]
    )  # (6, B, 3, H, W)
    index = sector.unsqueeze(0).expand(1, -1, 3, -1, -1)
    return table.gather(0, index).squeeze(0)


ADJUSTMENTS = {
    BRIGHTNESS: adjust_brightness,
    CONTRAST: adjust_contrast,
    SATURATION: adjust_saturation,
    HUE: adjust_hue,
}


def color_jitter(images: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Apply each selected image's four adjustments in that image's own order.

    Every adjustment runs on the whole batch and ``torch.where`` keeps it for the images whose
    turn it is: constant tensor shapes (no per-step kernel set-up on CPUs, no recompilation)
    for a little redundant element-wise work.
    """
    selected = params.jitter.to(images.device)
    order = params.order.to(images.device)
    factors = params.factors.to(images.device)
    for slot in range(4):
        for adjustment, function in ADJUSTMENTS.items():
            chosen = (selected & (order[:, slot] == adjustment)).view(-1, 1, 1, 1)
            images = torch.where(chosen, function(images, factors[:, adjustment]), images)
    return images


def gaussian_kernel_size(out_px: int, fraction: float) -> int:
    """An odd kernel side of about ``fraction`` of the image (23 px at 224 px, at least 3)."""
    size = int(out_px * fraction)
    return max(3, size + 1 - size % 2)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each image with its own sigma: separable kernels, reflect padding (torchvision's)."""
    n, channels, height, width = images.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    sigma = sigma.to(images.device, images.dtype).view(n, 1)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, dim=0)
    flat = images.reshape(1, n * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * channels, 1, 1, -1), groups=n * channels)
    flat = F.conv2d(flat, kernel.view(n * channels, 1, -1, 1), groups=n * channels)
    return flat.view(n, channels, height, width)


def augment(
    pixels: torch.Tensor, params: ViewParams, out_px: int, settings: AugmentSettings
) -> torch.Tensor:
    """One augmented, normalised view (B, 3, out_px, out_px) float32 of uint8 ``pixels``."""
    images = pixels.float().div_(255.0)
    images = resized_crop(images, params.crop, out_px, params.hflip, params.vflip)
    images = color_jitter(images.clamp(0, 1), params)
    gray = params.grayscale.to(images.device).view(-1, 1, 1, 1)
    images = torch.where(gray, grayscale(images).expand_as(images), images)
    if params.blur.any():  # blur all (constant shapes), keep it where drawn
        kernel = gaussian_kernel_size(out_px, settings.blur_kernel_fraction)
        blurred = gaussian_blur(images, params.sigma, kernel)
        images = torch.where(params.blur.to(images.device).view(-1, 1, 1, 1), blurred, images)
    return normalize(images, settings)


def normalize(images: torch.Tensor, settings: AugmentSettings) -> torch.Tensor:
    """(x - mean) / std per channel, for images in [0, 1]."""
    mean = torch.tensor(settings.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(settings.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std
