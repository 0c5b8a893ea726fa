"""CMUS preprocessing, batching and the training loop's learning signal."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmdiag.methods.cmus.data import PatientSample, collate_patients, load_image
from mmdiag.models import create_model
from mmdiag.training.loop import TrainSettings, predict_proba, train_model

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def test_tem_legend_is_cut_before_resizing(tmp_path):
    # 100x100 grayscale TEM: black image area, white legend in the bottom 10 rows
    pixels = np.zeros((100, 100), dtype=np.uint8)
    pixels[90:] = 255
    path = tmp_path / "tem.tif"
    Image.fromarray(pixels).save(path)
    cropped = load_image(path, size_px=16, crop_bottom_px=10)
    assert cropped.shape == (3, 16, 16) and cropped.dtype == torch.uint8
    assert cropped.max() == 0  # no legend pixel survives
    uncropped = load_image(path, size_px=16)
    assert uncropped[:, -1].float().mean() > 200  # the legend is there without the crop
    with pytest.raises(ValueError, match="tem.tif.*legend rows"):
        load_image(path, size_px=16, crop_bottom_px=100)


def test_unreadable_image_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(path, size_px=16)


def _sample(patient_id, label, n_tem, value=128):
    image = torch.full((3, 8, 8), value, dtype=torch.uint8)
    return PatientSample(patient_id, label, image, image, image.expand(n_tem, 3, 8, 8).clone())


def test_collate_indexes_tem_bags_and_normalises():
    batch = collate_patients([_sample("a", 0, 2), _sample("b", 2, 3)], mean=MEAN, std=STD)
    assert batch["om"].shape == (2, 3, 8, 8) and batch["tem"].shape == (5, 3, 8, 8)
    assert batch["tem_patient"].tolist() == [0, 0, 1, 1, 1]
    assert batch["label"].tolist() == [0, 2]
    torch.testing.assert_close(batch["om"], torch.full_like(batch["om"], (128 / 255 - 0.5) / 0.25))


def test_flips_are_seeded_and_only_with_a_generator():
    ramp = torch.arange(64, dtype=torch.uint8).view(1, 8, 8).expand(3, 8, 8).clone()
    sample = PatientSample("a", 0, ramp, ramp, ramp[None].repeat(6, 1, 1, 1))
    plain = collate_patients([sample], mean=MEAN, std=STD)
    assert torch.equal(plain["tem"][0], plain["om"][0])
    flipped = [
        collate_patients(
            [sample], mean=MEAN, std=STD, augment_generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    ]
    assert torch.equal(flipped[0]["tem"], flipped[1]["tem"])
    images = flipped[0]["tem"]
    candidates = [
        plain["om"][0],
        plain["om"][0].flip(-1),
        plain["om"][0].flip(-2),
        plain["om"][0].flip(-1, -2),
    ]
    assert all(any(torch.equal(img, c) for c in candidates) for img in images)
    assert any(not torch.equal(img, plain["om"][0]) for img in images)


def _patterned_samples(n_per_class, seed):
    """Class k lights up quadrant k of the IM image and of every TEM image (plus noise)."""
    generator = torch.Generator().manual_seed(seed)

    def images(label, n):
        pixels = torch.randint(0, 60, (n, 3, 32, 32), generator=generator)
        row, col = divmod(label, 2)
        pixels[:, :, row * 16 : row * 16 + 16, col * 16 : col * 16 + 16] += 180
        return pixels.to(torch.uint8)

    samples = []
    for index in range(3 * n_per_class):
        label = index % 3
        om = torch.randint(0, 255, (3, 32, 32), generator=generator, dtype=torch.uint8)
        samples.append(PatientSample(f"p{index}", label, om, images(label, 1)[0], images(label, 3)))
    return samples


def test_training_learns_a_planted_signal():
    torch.manual_seed(0)
    train, test = _patterned_samples(6, seed=1), _patterned_samples(4, seed=2)
    model = create_model("cmus_concat", num_classes=3, encoder="test_convnext", hidden_dim=32)

    def collate(samples, generator):
        return collate_patients(samples, mean=MEAN, std=STD, augment_generator=None)

    settings = TrainSettings(epochs=15, batch_size=6, lr=3e-3, lr_min=1e-4, weight_decay=0.0)
    history = train_model(model, train, collate, settings, val_samples=test)
    assert [row["epoch"] for row in history] == list(range(1, 16))
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["lr"] < history[0]["lr"]  # cosine annealing
    prob, _ = predict_proba(model, test, collate, batch_size=4, device=torch.device("cpu"))
    torch.testing.assert_close(prob.sum(1), torch.ones(len(test)))
    accuracy = (prob.argmax(1) == torch.tensor([s.label for s in test])).float().mean().item()
    assert accuracy >= 0.8  # chance is 1/3


def test_a_last_batch_of_one_joins_the_previous_one():
    from mmdiag.training.loop import batch_indices

    assert batch_indices(13, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert batch_indices(12, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert batch_indices(1, 4) == [[0]]
    order = torch.tensor([4, 3, 2, 1, 0])
    assert batch_indices(5, 2, order) == [[4, 3], [2, 1, 0]]
