"""SimSiam on two CPU processes (torchrun, gloo) learns what one process learns.

The worker script, written into the test's folder, first checks :class:`CrossRankBatchNorm`
on a fixed batch split across the ranks (outputs and gradients saved by rank 0), then runs
:func:`pretrain` exactly as a one-process run does.
"""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from mmdiag.ssl.train import pretrain

from .ssl_helpers import tiny_settings, torch_threads, write_textured_store

BIN = Path(sys.executable).parent

WORKER = textwrap.dedent(
    """
    import json
    import sys

    import torch
    import torch.distributed as dist

    from mmdiag.ssl.augment import AugmentSettings
    from mmdiag.ssl.train import SSLSettings, pretrain
    from mmdiag.training.distributed import CrossRankBatchNorm, init_distributed, rank_share


    def batchnorm_check(context, out_path):
        generator = torch.Generator().manual_seed(0)
        x = 3 * torch.randn(8, 4, 5, 5, generator=generator, dtype=torch.float64) + 1
        upstream = torch.randn(8, 4, 5, 5, generator=generator, dtype=torch.float64)
        norm = CrossRankBatchNorm(4, dtype=torch.float64)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(4, generator=generator, dtype=torch.float64))
            norm.bias.copy_(torch.randn(4, generator=generator, dtype=torch.float64))
        share = rank_share(torch.arange(8), context)
        local = x[share].clone().requires_grad_()
        out = norm(local)
        (out * upstream[share]).sum().backward()
        gathered = {}
        for name, tensor in (("out", out.detach()), ("x_grad", local.grad)):
            parts = [torch.empty_like(tensor) for _ in range(context.world_size)]
            dist.all_gather(parts, tensor.contiguous())
            gathered[name] = torch.cat(parts)
        for name in ("weight", "bias"):
            grad = getattr(norm, name).grad.clone()
            dist.all_reduce(grad)  # each rank holds its share's part of the gradient
            gathered[name + "_grad"] = grad
        gathered["running_mean"], gathered["running_var"] = norm.running_mean, norm.running_var
        if context.is_main:
            torch.save(gathered, out_path)


    settings_json, out_dir, *stores = sys.argv[1:]
    values = json.loads(settings_json)
    values["augment"] = AugmentSettings.from_config(values["augment"])
    context = init_distributed("cpu")
    batchnorm_check(context, out_dir + ".batchnorm.pt")
    pretrain(stores, "20x", SSLSettings(**values), out_dir=out_dir,
             state_dir=out_dir + ".state", progress=False)
    """
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _torchrun(tmp_path: Path, settings, stores, out_dir: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [
        str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(script),
        json.dumps(asdict(settings)), str(out_dir), *map(str, stores),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_processes_train_the_weights_of_one(tmp_path):
    """Three epochs of 16 images per rank. Longer runs drift apart as any two runs do whose
    float sums differ (one process with one vs two threads drifts as fast): these tiny
    SimSiam models amplify rounding differences by about ten per step after a few steps."""
    stores = [write_textured_store(tmp_path / f"slide{i}.zarr", 40, seed=i) for i in range(2)]
    settings = tiny_settings(epochs=3, batch_size=32, base_lr=0.2)
    _torchrun(tmp_path, settings, stores, tmp_path / "two")
    pretrain(
        stores, "20x", settings, out_dir=tmp_path / "one", state_dir=tmp_path / "one.state",
        progress=False,
    )  # fmt: skip

    two = load_file(str(tmp_path / "two" / "encoder.safetensors"))
    one = load_file(str(tmp_path / "one" / "encoder.safetensors"))
    assert two.keys() == one.keys()
    floats = [key for key in one if one[key].is_floating_point()]
    for key in set(one) - set(floats):
        assert torch.equal(two[key], one[key]), key
    for key in floats:  # BN biases stay near 0 here: relative to at least 1e-2
        scale = max(one[key].norm().item(), 1e-2)
        assert (two[key] - one[key]).norm().item() < 1e-4 * scale, key
    # the updates themselves agree (they are about 0.3% of the weights)
    torch.manual_seed(settings.seed)
    initial = timm.create_model("test_resnet", num_classes=0).state_dict()
    update_one = torch.cat([(one[k] - initial[k]).flatten() for k in floats])
    update_two = torch.cat([(two[k] - initial[k]).flatten() for k in floats])
    assert update_one.norm() > 1e-3 * torch.cat([one[k].flatten() for k in floats]).norm()
    assert (update_two - update_one).norm() < 1e-3 * update_one.norm()

    logs = [pd.read_csv(tmp_path / name / "train_log.tsv", sep="\t") for name in ("two", "one")]
    for column in ("epoch", "lr"):
        assert logs[0][column].tolist() == logs[1][column].tolist()
    for column in ("loss", "embedding_std"):
        assert logs[0][column].tolist() == pytest.approx(logs[1][column].tolist(), abs=1e-5)
    assert not (tmp_path / "two.state").exists()

    _check_batchnorm(torch.load(tmp_path / "two.batchnorm.pt"))


def _check_batchnorm(two_ranks: dict) -> None:
    """CrossRankBatchNorm over two shares equals BatchNorm2d over the whole batch."""
    generator = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(8, 4, 5, 5, generator=generator, dtype=torch.float64) + 1
    upstream = torch.randn(8, 4, 5, 5, generator=generator, dtype=torch.float64)
    norm = nn.BatchNorm2d(4, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(4, generator=generator, dtype=torch.float64))
        norm.bias.copy_(torch.randn(4, generator=generator, dtype=torch.float64))
    x.requires_grad_()
    out = norm(x)
    (out * upstream).sum().backward()
    expected = {
        "out": out.detach(),
        "x_grad": x.grad,
        "weight_grad": norm.weight.grad,
        "bias_grad": norm.bias.grad,
        "running_mean": norm.running_mean,
        "running_var": norm.running_var,
    }
    assert two_ranks.keys() == expected.keys()
    for name, value in expected.items():
        difference = (two_ranks[name] - value).abs().max().item()
        assert difference < 1e-12 * max(1.0, value.abs().max().item()), name
