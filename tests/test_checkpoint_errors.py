"""Unusable encoder checkpoints (truncated, not a checkpoint, another architecture, missing
tensors) fail with an error naming the file and the problem, in ``extract-features`` too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mmdiag.cli import app
from mmdiag.data.manifest import MANIFEST_COLUMNS, write_manifest
from mmdiag.features.extract import ExtractSettings, extract_cohort_features
from mmdiag.models.encoders import CheckpointError, create_encoder, read_state_dict
from mmdiag.patching.store import write_patch_store
from mmdiag.ssl.train import pretrain

from .ssl_helpers import patch_grid, textured_pixels, tiny_settings, torch_threads

SCALES = ("20x", "10x")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    """A slide's patch store, its manifest, and the 20x encoder SimSiam pretraining wrote."""
    folder = tmp_path_factory.mktemp("cohort")
    slide = folder / "slide.svs"
    slide.write_bytes(b"slide")
    store = write_patch_store(
        folder / "slide.zarr",
        patch_grid(16, scales=SCALES),
        attrs={"slide_path": str(slide.resolve())},
        pixels={scale: textured_pixels(16, seed=k) for k, scale in enumerate(SCALES)},
    )
    row = dict.fromkeys(MANIFEST_COLUMNS, "")
    row |= {"patient_id": "P1", "modality": "WSI", "image_id": "slide", "path": str(slide)}
    row |= {"width_px": 1, "height_px": 1, "disease": "MN", "survival_months": np.nan}
    manifest = write_manifest(pd.DataFrame([row]), folder / "manifest.tsv")
    ssl = tiny_settings(epochs=1)
    pretrain([store], "20x", ssl, out_dir=folder / "ssl", state_dir=folder / "state")
    return {"store": store, "manifest": manifest, "encoder": folder / "ssl" / "encoder.safetensors"}


def _cut(source: Path, target: Path, keep_bytes: int) -> Path:
    target.write_bytes(source.read_bytes()[:keep_bytes])
    return target


def _error(path: Path, name: str = "test_resnet") -> str:
    with pytest.raises(CheckpointError) as info:
        create_encoder(name, checkpoint=path)
    return str(info.value)


# --------------------------------------------------------------------------- unreadable files


def test_truncated_safetensors_names_the_file_and_the_missing_bytes(cohort, tmp_path) -> None:
    encoder = cohort["encoder"]
    size = encoder.stat().st_size
    half = _cut(encoder, tmp_path / "half.safetensors", size // 2)
    message = _error(half)
    assert message == (
        f"checkpoint {half}: truncated: {size // 2} bytes, but its header describes {size} bytes "
        f"({size - size // 2} missing; an interrupted copy or a full disk?)"
    )


@pytest.mark.parametrize("keep_bytes", [0, 5, 100])
def test_safetensors_cut_inside_its_header_names_the_file(cohort, tmp_path, keep_bytes) -> None:
    cut = _cut(cohort["encoder"], tmp_path / "cut.safetensors", keep_bytes)
    message = _error(cut)
    assert message.startswith(f"checkpoint {cut}: truncated or not a safetensors file: ")
    assert f"{keep_bytes} bytes" in message


def test_truncated_torch_checkpoint_names_the_file(cohort, tmp_path) -> None:
    full = tmp_path / "encoder.pt"
    torch.save(read_state_dict(cohort["encoder"]), full)
    cut = _cut(full, tmp_path / "cut.pt", full.stat().st_size // 2)
    message = _error(cut)
    assert message.startswith(
        f"checkpoint {cut}: cannot be read as a torch checkpoint, truncated or not a checkpoint "
        "file (RuntimeError: PytorchStreamReader failed"
    )


@pytest.mark.parametrize("name", ["notes.safetensors", "notes.pt"])
def test_a_text_file_is_not_a_checkpoint(tmp_path, name) -> None:
    text = tmp_path / name
    text.write_text("encoder weights are on the other disk\n" * 4)
    message = _error(text)
    assert message.startswith(f"checkpoint {text}: ")
    assert "not a safetensors file" in message or "not a checkpoint file" in message


def test_format_is_told_from_the_content_not_the_suffix(cohort, tmp_path) -> None:
    """A safetensors file named .pt and a torch file named .safetensors both load."""
    state = read_state_dict(cohort["encoder"])
    renamed = tmp_path / "encoder.pt"
    renamed.write_bytes(cohort["encoder"].read_bytes())
    torch_named_safetensors = tmp_path / "torch.safetensors"
    torch.save({"state_dict": state}, torch_named_safetensors)
    for path in (renamed, torch_named_safetensors):
        loaded = create_encoder("test_resnet", checkpoint=path).state_dict()
        for key, value in state.items():
            torch.testing.assert_close(loaded[key], value)


def test_missing_checkpoint_is_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path}/absent.safetensors"):
        create_encoder("test_resnet", checkpoint=tmp_path / "absent.safetensors")


# --------------------------------------------------------------------------- wrong checkpoints


def test_wrong_architecture_names_the_mismatched_tensors(cohort) -> None:
    """test_vit and test_vit3 share tensor names but not widths."""
    path = cohort["encoder"].parent / "vit.safetensors"
    save_file(create_encoder("test_vit").state_dict(), str(path))
    message = _error(path, "test_vit3")
    assert message.startswith(f"encoder checkpoint {path}: shape mismatch with encoder 'test_vit3'")
    assert "; blocks.0.attn.proj.weight: checkpoint (64, 64), encoder (96, 96); " in message
    assert "and 66 more" in message
    assert "(is it the same architecture as the configured encoder?)" in message


def test_unrelated_architecture_names_the_checkpoint_tensors(cohort) -> None:
    message = _error(cohort["encoder"], "test_vit")
    assert message.startswith(
        f"encoder checkpoint {cohort['encoder']}: no parameter name matches encoder 'test_vit' "
        "(checkpoint tensors: "
    )
    assert "bn1.bias" in message


def test_missing_tensors_are_counted_and_named(cohort, tmp_path) -> None:
    state = read_state_dict(cohort["encoder"])
    kept = {k: v for k, v in state.items() if not k.startswith("layer")}
    partial = tmp_path / "partial.safetensors"
    save_file(kept, str(partial))
    n_missing = sum(k.startswith("layer") and "num_batches" not in k for k in state)
    message = _error(partial)
    assert message.startswith(
        f"encoder checkpoint {partial}: {n_missing} of {len(state)} tensors of encoder "
        "'test_resnet' are missing: layer"
    )
    assert message.endswith("(a partial checkpoint, or another architecture?)")


# --------------------------------------------------------------------------- extract-features


def _settings() -> ExtractSettings:
    values = dict(batch_size=4, workers=0, amp=False, channels_last=False, device="cpu")
    return ExtractSettings(backbone="test_resnet", **values)


def test_extraction_with_a_truncated_encoder_names_it_and_writes_nothing(cohort, tmp_path):
    cut = _cut(cohort["encoder"], tmp_path / "10x.safetensors", 4096)
    weights = {"20x": cohort["encoder"], "10x": cut}
    with pytest.raises(CheckpointError, match=f"checkpoint {cut}: truncated"):
        extract_cohort_features(
            [cohort["store"]], ["slide"], weights, _settings(), out_dir=tmp_path / "f"
        )
    assert not (tmp_path / "f").exists()


def test_cli_reports_a_truncated_encoder_without_a_traceback(cohort, tmp_path) -> None:
    size = cohort["encoder"].stat().st_size
    cut = _cut(cohort["encoder"], tmp_path / "enc.safetensors", size - 1000)
    settings = {
        "features": {
            "image_px": None,
            "batch_size": 4,
            "workers": 0,
            "amp": False,
            "channels_last": False,
            "device": "cpu",
        },
        "ssl": {"backbone": "test_resnet", "augment": {"mean": [0.5] * 3, "std": [0.2] * 3}},
    }
    arguments = [
        "extract-features", str(cohort["store"]), "--manifest", str(cohort["manifest"]),
        "--encoder", f"20x={cohort['encoder']}", "--encoder", f"10x={cut}",
        "--out-dir", str(tmp_path / "features"), "--settings-json", json.dumps(settings),
    ]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 1
    output = " ".join(result.output.split())  # the console wraps long lines
    assert f"checkpoint {cut}: truncated: {size - 1000} bytes, but its header describes" in output
    assert "Traceback" not in result.output
    assert not (tmp_path / "features").exists()
