"""SimSiam's batched augmentations against torchvision's per-image definitions."""

import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from mmdiag.ssl import augment as A
from mmdiag.ssl.augment import AugmentSettings, ViewParams, sample_view_params

from .ssl_helpers import torch_threads

N_DRAWS = 20_000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _images(n=6, height=20, width=24, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _draw(n, height=32, width=32, seed=0, settings=None) -> ViewParams:
    generator = torch.Generator().manual_seed(seed)
    return sample_view_params(n, height, width, settings or AugmentSettings(), generator)


@pytest.mark.parametrize(
    ("ours", "reference", "factors"),
    [
        (A.adjust_brightness, TF.adjust_brightness, [0.0, 0.6, 1.0, 1.4, 2.0, 0.9]),
        (A.adjust_contrast, TF.adjust_contrast, [0.0, 0.6, 1.0, 1.4, 2.0, 0.9]),
        (A.adjust_saturation, TF.adjust_saturation, [0.0, 0.6, 1.0, 1.4, 2.0, 0.9]),
        (A.adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.05, 0.3, 0.5]),
    ],
)
def test_colour_adjustments_equal_torchvision_per_image(ours, reference, factors):
    images = _images()
    images[0, :, :4] = 0.5  # gray pixels: hue undefined, saturation 0
    images[1, 0] = images[1, 1]  # ties between the maximum channels
    out = ours(images, torch.tensor(factors))
    for i, factor in enumerate(factors):
        torch.testing.assert_close(out[i], reference(images[i], factor), rtol=0, atol=2e-6)


@pytest.mark.parametrize("kernel_size", [3, 5, 9])
def test_gaussian_blur_equals_torchvision_with_the_same_kernel(kernel_size):
    images = _images()
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0, 3.0])
    out = A.gaussian_blur(images, sigma, kernel_size)
    for i, s in enumerate(sigma.tolist()):
        expected = TF.gaussian_blur(images[i], [kernel_size, kernel_size], [s, s])
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-6)


def test_gaussian_kernel_size_is_odd_and_about_a_tenth():
    assert A.gaussian_kernel_size(224, 0.1) == 23
    assert A.gaussian_kernel_size(32, 0.1) == 3
    assert A.gaussian_kernel_size(100, 0.1) == 11
    assert all(A.gaussian_kernel_size(px, 0.1) % 2 == 1 for px in range(8, 300))


def test_full_image_resized_crop_equals_torchvision():
    images = _images(height=20, width=24)
    crop = torch.tensor([[0.0, 0.0, 24.0, 20.0]]).repeat(len(images), 1)
    for out_px in (16, 24, 40):
        out = A.resized_crop(images, crop, out_px)
        for i in range(len(images)):
            expected = TF.resized_crop(images[i], 0, 0, 20, 24, [out_px, out_px], antialias=False)
            torch.testing.assert_close(out[i], expected, rtol=0, atol=2e-6)


def test_resized_crop_interior_equals_torchvision():
    """Inside the crop both interpolate the same pixels; at its edge torchvision clamps to the
    crop while grid_sample reads the neighbouring image pixels."""
    images = _images(height=20, width=24)
    boxes = [(2, 3, 10, 12), (5, 1, 15, 9), (0, 7, 24, 13), (11, 0, 13, 20), (1, 1, 7, 7)]
    crop = torch.tensor(boxes, dtype=torch.float32)
    out = A.resized_crop(images[: len(boxes)], crop, 16)
    for i, (left, top, width, height) in enumerate(boxes):
        expected = TF.resized_crop(images[i], top, left, height, width, [16, 16], antialias=False)
        torch.testing.assert_close(
            out[i, :, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], rtol=0, atol=2e-6
        )


def test_flips_equal_torch_flip_of_the_unflipped_crop():
    images = _images(n=4)
    crop = torch.tensor([[2.0, 3.0, 10.0, 12.0], [5.0, 1.0, 15.0, 9.0]]).repeat(2, 1)
    hflip = torch.tensor([True, False, True, False])
    vflip = torch.tensor([False, True, True, False])
    plain = A.resized_crop(images, crop, 16)
    flipped = A.resized_crop(images, crop, 16, hflip, vflip)
    for i in range(4):
        dims = [d for d, flag in ((2, hflip[i]), (1, vflip[i])) if flag]
        expected = plain[i].flip(dims) if dims else plain[i]
        torch.testing.assert_close(flipped[i], expected, rtol=0, atol=1e-6)


def test_sample_view_params_is_seeded():
    first, second, other = _draw(64, seed=3), _draw(64, seed=3), _draw(64, seed=4)
    for name in vars(first):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(first.crop, other.crop)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (30, 50), (64, 20)])
def test_crop_boxes_lie_inside_with_area_and_aspect_in_range(height, width):
    settings = AugmentSettings()
    params = _draw(N_DRAWS, height, width, seed=1)
    left, top, crop_w, crop_h = params.crop.double().unbind(1)
    assert torch.equal(params.crop, params.crop.round())  # whole pixels
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + crop_w <= width).all() and (top + crop_h <= height).all()
    assert (crop_w >= 1).all() and (crop_h >= 1).all()
    # rounding each side to whole pixels moves area and aspect by up to half a pixel per side
    # (the central fallback crop of an elongated image also keeps them in range)
    low_w, high_w, low_h, high_h = crop_w - 0.5, crop_w + 0.5, crop_h - 0.5, crop_h + 0.5
    area_low, area_high = settings.crop_scale
    assert (high_w * high_h >= area_low * height * width).all()
    assert (low_w * low_h <= area_high * height * width).all()
    ratio_low, ratio_high = settings.crop_ratio
    assert (high_w / low_h >= ratio_low).all() and (low_w / high_h <= ratio_high).all()


def test_crop_distribution_matches_torchvision_random_resized_crop():
    """Same retry algorithm: rejected tries bias areas below the uniform mean, equally."""
    height, width, n = 32, 40, 5000
    ours = _draw(n, height, width, seed=8).crop.double()
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = [T.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    top, left, crop_h, crop_w = torch.tensor(theirs, dtype=torch.float64).unbind(1)
    for name, a, b in [
        ("area", ours[:, 2] * ours[:, 3] / (height * width), crop_w * crop_h / (height * width)),
        ("log aspect", (ours[:, 2] / ours[:, 3]).log(), (crop_w / crop_h).log()),
        ("centre x", (ours[:, 0] + ours[:, 2] / 2) / width, (left + crop_w / 2) / width),
    ]:
        for q in (0.1, 0.5, 0.9):
            assert a.quantile(q).item() == pytest.approx(b.quantile(q).item(), abs=0.03), name
        assert a.mean().item() == pytest.approx(b.mean().item(), abs=0.015), name


def test_coin_flips_happen_with_their_probabilities():
    settings = AugmentSettings(jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    params = _draw(N_DRAWS, seed=2, settings=settings)
    for name, p in [
        ("hflip", 0.5),
        ("vflip", 0.5),
        ("jitter", 0.8),
        ("grayscale", 0.2),
        ("blur", 0.5),
    ]:
        tolerance = 5 * math.sqrt(p * (1 - p) / N_DRAWS)
        assert getattr(params, name).float().mean().item() == pytest.approx(p, abs=tolerance), name
    off = _draw(1000, settings=AugmentSettings(hflip=False, vflip=False, jitter_p=0.0))
    assert not off.hflip.any() and not off.vflip.any() and not off.jitter.any()


def test_jitter_factors_orders_and_sigmas_in_range():
    settings = AugmentSettings(jitter=(0.4, 0.3, 0.2, 0.1), blur_sigma=(0.1, 2.0))
    params = _draw(N_DRAWS, seed=5, settings=settings)
    for column, (low, high) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]):
        values = params.factors[:, column]
        assert values.min() >= low - 1e-6 and values.max() <= high + 1e-6
        assert values.mean().item() == pytest.approx((low + high) / 2, abs=0.01)
    assert torch.equal(params.order.sort(dim=1).values, torch.arange(4).expand(N_DRAWS, 4))
    first_counts = torch.bincount(params.order[:, 0], minlength=4).float() / N_DRAWS
    torch.testing.assert_close(first_counts, torch.full((4,), 0.25), rtol=0, atol=0.02)
    assert params.sigma.min() >= 0.1 and params.sigma.max() <= 2.0


def test_rows_of_a_global_draw_equal_slicing_and_augment_per_share():
    settings = AugmentSettings()
    params = _draw(8, 24, 24, seed=6)
    share = torch.arange(4, 8)
    part = params.rows(share)
    for name in vars(params):
        assert torch.equal(getattr(part, name), getattr(params, name)[4:8]), name
    pixels = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
    whole = A.augment(pixels, params, 16, settings)
    torch.testing.assert_close(
        A.augment(pixels[share], part, 16, settings), whole[share], rtol=0, atol=1e-6
    )


def _jitter_params(n: int, order, factors, selected) -> ViewParams:
    params = _draw(n)
    params.order = torch.tensor(order)
    params.factors = torch.tensor(factors)
    params.jitter = torch.tensor(selected)
    return params


TV_ADJUST = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]


def test_color_jitter_applies_each_images_own_order():
    images = _images(n=3)
    hue_first = [A.HUE, A.BRIGHTNESS, A.SATURATION, A.CONTRAST]
    factors = [[1.3, 0.7, 1.4, 0.08]] * 3
    params = _jitter_params(3, [hue_first, [0, 1, 2, 3], hue_first], factors, [True, True, False])
    out = A.color_jitter(images, params)
    for i, order in enumerate(params.order.tolist()[:2]):
        expected = images[i]
        for adjustment in order:
            expected = TV_ADJUST[adjustment](expected, factors[i][adjustment])
        torch.testing.assert_close(out[i], expected, rtol=0, atol=3e-6)
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # same factors, another order
    assert torch.equal(out[2], images[2])  # not selected: untouched


def _torchvision_view(pixels, params, out_px, settings, i) -> torch.Tensor:
    """One image of :func:`augment` composed from torchvision's per-image functions."""
    image = pixels[i : i + 1].float() / 255
    image = A.resized_crop(image, params.crop[i : i + 1], out_px)[0]  # tested above
    if params.hflip[i]:
        image = TF.horizontal_flip(image)
    if params.vflip[i]:
        image = TF.vertical_flip(image)
    image = image.clamp(0, 1)
    if params.jitter[i]:
        for adjustment in params.order[i].tolist():
            image = TV_ADJUST[adjustment](image, params.factors[i, adjustment].item())
    if params.grayscale[i]:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if params.blur[i]:
        kernel = A.gaussian_kernel_size(out_px, settings.blur_kernel_fraction)
        sigma = params.sigma[i].item()
        image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    return TF.normalize(image, list(settings.mean), list(settings.std))


def test_augment_equals_the_per_image_torchvision_composition():
    settings = AugmentSettings()
    pixels = torch.randint(0, 256, (24, 3, 40, 36), dtype=torch.uint8)
    params = _draw(24, 40, 36, seed=7, settings=settings)
    out = A.augment(pixels, params, 32, settings)
    assert out.shape == (24, 3, 32, 32) and out.dtype == torch.float32
    for flag in ("hflip", "vflip", "jitter", "grayscale", "blur"):  # every branch is exercised
        assert getattr(params, flag).any() and not getattr(params, flag).all(), flag
    for i in range(len(pixels)):
        expected = _torchvision_view(pixels, params, 32, settings, i)
        torch.testing.assert_close(out[i], expected, rtol=0, atol=2e-5)


def test_augment_keeps_a_gray_image_gray_under_colour_only_changes():
    """Contrast, saturation, hue, grayscale, blur, crops and flips leave a constant gray."""
    settings = AugmentSettings(jitter=(0.0, 0.4, 0.4, 0.1), jitter_p=1.0, grayscale_p=0.5)
    pixels = torch.full((16, 3, 32, 32), 128, dtype=torch.uint8)
    params = _draw(16, settings=settings)
    out = A.augment(pixels, params, 24, settings)
    expected = A.normalize(torch.full((1, 3, 24, 24), 128 / 255), settings).expand(16, -1, -1, -1)
    torch.testing.assert_close(out, expected, rtol=0, atol=5e-4)  # luma weights sum to 0.9999
    mean = torch.tensor(settings.mean).view(1, 3, 1, 1)
    std = torch.tensor(settings.std).view(1, 3, 1, 1)
    torch.testing.assert_close(expected[:1, :, :1, :1], (128 / 255 - mean) / std)
