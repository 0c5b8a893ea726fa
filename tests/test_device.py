"""The one device resolver of training and feature extraction (mmdiag.training.device)."""

import pytest
import torch

from mmdiag.training import distributed
from mmdiag.training.device import resolve_device
from mmdiag.training.loop import resolve_device as loop_resolve_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_loop_and_distributed_share_the_resolver():
    assert loop_resolve_device is resolve_device
    assert distributed.resolve_device is resolve_device


def test_auto_without_cuda_is_the_cpu(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", local_rank=3) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_auto_on_this_machine_without_cuda_is_the_cpu():
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_without_cuda_raises(no_cuda):
    with pytest.raises(RuntimeError, match="device 'cuda' requested but CUDA is not available"):
        resolve_device("cuda")


def test_init_distributed_raises_the_same_error(no_cuda, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="device 'cuda' requested but CUDA is not available"):
        distributed.init_distributed("cuda")
    assert distributed.init_distributed("auto").device == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:0", "", None])
def test_unknown_names_raise_value_error(name):
    with pytest.raises(ValueError, match=r"device must be one of 'auto', 'cpu', 'cuda', got "):
        resolve_device(name)
    with pytest.raises(ValueError, match=repr(name)):
        distributed.init_distributed(name)


def test_cuda_device_is_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match="LOCAL_RANK 2 but only 2 GPU"):
        resolve_device("cuda", local_rank=2)
