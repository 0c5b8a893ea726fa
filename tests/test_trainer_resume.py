"""Per-epoch resume of the per-fold trainers: a run cut short and rerun ends as if never cut.

Unit tests cut :func:`~mmdiag.training.loop.train_model` and CS-MIL's ``train_variant`` with
an exception in the middle of an epoch and rerun them on a fresh model (also on two torchrun
processes); the kill tests run the fold commands in a subprocess, SIGKILL them once a state has
been saved, run them again and compare their files with those of an uninterrupted run.

Run as a module (``python -m tests.test_trainer_resume OUT``, under torchrun),
this file is also the worker of the two-process test.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mmdiag.methods.csmil.fold import train_variant
from mmdiag.models import create_model
from mmdiag.training.distributed import barrier, init_distributed, shutdown, unwrap
from mmdiag.training.loop import TrainSettings, predict_proba, train_model
from mmdiag.training.resume import (
    STATE_INFO,
    EpochState,
    ResumeStateError,
    TrainerParts,
    state_dir_beside,
)

from .test_csmil_fold import _method, cohort  # noqa: F401 (a fixture)
from .test_distributed_training import _torchrun, tiny_fold  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]


class Killed(Exception):
    """Stands for the kill of a training process in the unit tests."""


@dataclass(frozen=True)
class Sample:
    label: int
    x: torch.Tensor


def make_samples(n: int, seed: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    labels = [i % 3 for i in range(n)]
    return [Sample(y, torch.randn(4, generator=generator) + y) for y in labels]


def collate(samples, generators=None) -> dict[str, torch.Tensor]:
    """Features, with per-sample noise drawn from each sample's generator when training."""
    x = torch.stack([s.x for s in samples])
    if generators is not None:
        x = x + 0.1 * torch.stack([torch.randn(4, generator=g) for g in generators])
    return {"x": x, "label": torch.tensor([s.label for s in samples])}


class Net(nn.Module):
    """Batch norm (running buffers), dropout (the loop's generator) and noise from torch's
    global generator: every random stream a resume must bring back.

    Data-parallel processes share the first one's global generator after a resume, so the
    two-process test leaves the ``noise`` out (the loop's own draws never use it).
    """

    def __init__(self, noise: bool = True) -> None:
        super().__init__()
        self.noise = noise
        self.body = nn.Sequential(
            nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
        )

    def forward(self, batch):
        x = batch["x"]
        if self.training and self.noise:
            x = x + 0.05 * torch.randn_like(x)
        return self.body(x)


def fresh_net(noise: bool = True) -> Net:
    torch.manual_seed(7)  # as a fold runner seeds before building its model
    return Net(noise)


TRAIN, VAL = make_samples(13, seed=1), make_samples(6, seed=2)
BASE = dict(epochs=8, batch_size=4, lr=0.05, lr_min=1e-4, weight_decay=1e-4, device="cpu")
RECIPES = {
    "adam_cosine_best": dict(optimizer="adam", amsgrad=True, restore_best=True),
    "sgd_plateau_early_stop": dict(
        optimizer="sgd",
        nesterov=True,
        scheduler="plateau",
        plateau_patience=1,
        plateau_factor=0.5,
        early_stopping_patience=3,
        restore_best=True,
        monitor="val_acc",
        monitor_mode="max",
        sampler="balanced",
        class_weights="balanced",
    ),
}


def settings_of(recipe: str, **overrides) -> TrainSettings:
    return TrainSettings(**(BASE | RECIPES[recipe] | overrides))


def kill_at_step(step: int):
    """A ``before_step`` hook that raises :class:`Killed` at its ``step``-th call (from 1)."""
    calls = []

    def hook(model, batch, terms):
        calls.append(1)
        if len(calls) == step:
            raise Killed(f"killed at step {step}")

    hook.calls = calls
    return hook


def counting_hook():
    return kill_at_step(0)  # never raises; counts the optimiser steps


def train(settings: TrainSettings, resume_dir: Path | None, hook=None):
    """Train a fresh model; its log (without timings), weights and validation probabilities."""
    model = fresh_net()
    history = train_model(
        model, TRAIN, collate, settings, val_samples=VAL, before_step=hook, resume_dir=resume_dir
    )
    prob, _ = predict_proba(model, VAL, collate, batch_size=4, device=torch.device("cpu"))
    return _untimed(history), model.state_dict(), prob


def _untimed(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def saved_epochs(state_dir: Path) -> int:
    return json.loads((state_dir / STATE_INFO).read_text())["epochs_done"]


STEPS_PER_EPOCH = 3  # 13 samples in batches of 4: 4, 4, 5 (a last batch of 1 joins)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("killed_in_epoch", [2, 6])
def test_a_cut_run_resumes_to_the_uninterrupted_result(tmp_path, recipe, killed_in_epoch, caplog):
    settings = settings_of(recipe)
    whole_history, whole_weights, whole_prob = train(settings, None)
    if recipe == "sgd_plateau_early_stop":  # the schedule and early stopping both act
        assert len({row["lr"] for row in whole_history}) > 1
        assert len(whole_history) < settings.epochs
    state_dir = tmp_path / "state"
    kill_step = (killed_in_epoch - 1) * STEPS_PER_EPOCH + 2  # inside the epoch
    with pytest.raises(Killed):
        train(settings, state_dir, kill_at_step(kill_step))
    assert saved_epochs(state_dir) == killed_in_epoch - 1

    hook = counting_hook()
    with caplog.at_level(logging.INFO, logger="mmdiag.training.resume"):
        history, weights, prob = train(settings, state_dir, hook)
    assert f"after epoch {killed_in_epoch - 1}" in caplog.text
    epochs_run = len(whole_history) - (killed_in_epoch - 1)
    assert len(hook.calls) == epochs_run * STEPS_PER_EPOCH  # only the missing epochs ran
    assert history == whole_history
    assert_same_weights(weights, whole_weights)
    assert torch.equal(prob, whole_prob)


def test_a_run_killed_after_its_last_epoch_trains_no_more(tmp_path):
    """Early stopping had ended the saved run: the rerun restores the best epoch at once."""
    settings = settings_of("sgd_plateau_early_stop")
    state_dir = tmp_path / "state"
    whole_history, whole_weights, _ = train(settings, state_dir)  # the state stays
    assert saved_epochs(state_dir) == len(whole_history) < settings.epochs
    hook = counting_hook()
    history, weights, _ = train(settings, state_dir, hook)
    assert hook.calls == []
    assert history == whole_history
    assert_same_weights(weights, whole_weights)


def test_a_state_of_other_settings_gives_a_fresh_start(tmp_path, caplog):
    state_dir = tmp_path / "state"
    with pytest.raises(Killed):
        train(settings_of("adam_cosine_best"), state_dir, kill_at_step(2 * STEPS_PER_EPOCH + 1))
    changed = settings_of("adam_cosine_best", lr=0.03)
    hook = counting_hook()
    with caplog.at_level(logging.WARNING, logger="mmdiag.training.resume"):
        history, weights, _ = train(changed, state_dir, hook)
    assert "starting afresh" in caplog.text
    assert len(hook.calls) == changed.epochs * STEPS_PER_EPOCH
    fresh_history, fresh_weights, _ = train(changed, None)
    assert history == fresh_history
    assert_same_weights(weights, fresh_weights)


def test_other_initial_weights_give_a_fresh_start(tmp_path):
    settings = settings_of("adam_cosine_best")
    state_dir = tmp_path / "state"
    with pytest.raises(Killed):
        train(settings, state_dir, kill_at_step(STEPS_PER_EPOCH + 1))
    torch.manual_seed(8)
    other = Net()
    hook = counting_hook()
    train_model(other, TRAIN, collate, settings, val_samples=VAL, before_step=hook,
                resume_dir=state_dir)  # fmt: skip
    assert len(hook.calls) == settings.epochs * STEPS_PER_EPOCH


def test_a_damaged_state_is_an_error_naming_the_file(tmp_path):
    settings = settings_of("adam_cosine_best")
    state_dir = tmp_path / "state"
    with pytest.raises(Killed):
        train(settings, state_dir, kill_at_step(STEPS_PER_EPOCH + 1))
    info = json.loads((state_dir / STATE_INFO).read_text())
    tensors = state_dir / info["tensors"]
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(ResumeStateError, match=rf"{tensors.name}.*delete .*state"):
        train(settings, state_dir)
    (state_dir / STATE_INFO).write_text("{not json")
    with pytest.raises(ResumeStateError, match=STATE_INFO):
        train(settings, state_dir)


def test_only_the_writing_process_saves_and_old_files_are_removed(tmp_path):
    model = nn.Linear(2, 2)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    parts = TrainerParts(model, optimiser)
    EpochState(tmp_path / "reader", "key", parts, writes=False).save([{"epoch": 1}])
    assert not (tmp_path / "reader").exists()
    state = EpochState(tmp_path / "writer", "key", parts)
    (tmp_path / "writer" / ".tensors_00003.safetensors.x.tmp").mkdir(parents=True)  # a kill's
    state.save([{"epoch": 1}])
    state.save([{"epoch": 1}, {"epoch": 2}])
    assert sorted(p.name for p in (tmp_path / "writer").iterdir()) == [
        STATE_INFO,
        "tensors_00002.safetensors",
    ]
    with pytest.raises(ValueError, match="reserved"):
        state.save([], extra_tensors={"model": {}})


def test_the_state_folder_lives_beside_the_outputs():
    assert state_dir_beside(Path("results/cmus/v/fold_3")) == Path("results/cmus/v/.fold_3.resume")


def _train_on_processes(context, state_dir: Path, kill_step: int = 0) -> dict:
    """Train a fresh model on this process's share (cut at ``kill_step``; 0: never)."""
    model, hook = fresh_net(noise=False), kill_at_step(kill_step)
    history = train_model(
        model,
        TRAIN,
        collate,
        settings_of("adam_cosine_best", epochs=4),
        val_samples=VAL,
        context=context,
        before_step=hook,
        resume_dir=state_dir,
    )
    state = {k: v.clone() for k, v in unwrap(model).state_dict().items()}
    return {"history": _untimed(history), "state": state, "steps": len(hook.calls)}


def _two_process_worker(out: Path) -> None:
    """The torchrun worker: an uninterrupted run, a run cut in epoch 3 and its resumption;
    the first process saves the results to ``out``."""
    context = init_distributed("cpu")
    whole = _train_on_processes(context, out.parent / "whole_state")
    state_dir = out.parent / "state"
    with pytest.raises(Killed):
        _train_on_processes(context, state_dir, kill_step=2 * STEPS_PER_EPOCH + 2)
    barrier(context)
    resumed = _train_on_processes(context, state_dir)
    if context.is_main:
        torch.save({"whole": whole, "resumed": resumed}, out)
    shutdown(context)


def test_two_processes_resume_the_state_the_first_one_saved(tmp_path):
    """All processes load the state that the first one wrote; the resumed two-process run
    equals an uninterrupted one."""
    command = [*_torchrun(2), "-m", "tests.test_trainer_resume", str(tmp_path / "out.pt")]
    result = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = torch.load(tmp_path / "out.pt")
    whole, resumed = outcome["whole"], outcome["resumed"]
    assert resumed["steps"] == 2 * STEPS_PER_EPOCH  # epochs 3 and 4 only
    assert resumed["history"] == whole["history"]
    assert_same_weights(resumed["state"], whole["state"])


# ----------------------------------------------------------------------------- CS-MIL


def _csmil_inputs(cohort):  # noqa: F811 (the fixture)
    from mmdiag.methods.csmil.data import load_slides

    slides = list(
        load_slides(cohort["manifest"], cohort["stores"], cohort["clusters"], "positive").values()
    )
    settings = _method({"csmil": None})
    settings["train"] |= {"epochs": 5}
    return slides[:12], slides[12:16], settings


def _train_csmil(cohort, resume_dir, kill_after_batches=None):  # noqa: F811
    train, val, settings = _csmil_inputs(cohort)
    torch.manual_seed(0)
    model = create_model("csmil", in_dim=16)
    if kill_after_batches is not None:
        original, calls = model.loss, []

        def loss(batch):
            calls.extend([1] if model.training else [])  # training batches only
            if len(calls) > kill_after_batches:
                raise Killed
            return original(batch)

        model.loss = loss
    rng = np.random.default_rng([0, 0])
    history = train_variant(
        model, train, val, settings, rng, stratified=True, resume_dir=resume_dir
    )
    return _untimed(history), model.state_dict(), rng.random(3)


def test_csmil_training_resumes_with_its_bag_generator(cohort, tmp_path):  # noqa: F811
    whole_history, whole_weights, whole_next_draws = _train_csmil(cohort, None)
    assert any(row.get("selected") for row in whole_history[1:])  # selection is exercised
    state_dir = tmp_path / "state"
    batches_per_epoch = 12 * _csmil_inputs(cohort)[2]["bags"]["train_bags_per_slide"] // 2
    with pytest.raises(Killed):
        _train_csmil(cohort, state_dir, kill_after_batches=2 * batches_per_epoch + 1)
    assert saved_epochs(state_dir) == 2
    history, weights, next_draws = _train_csmil(cohort, state_dir)
    assert history == whole_history
    assert_same_weights(weights, whole_weights)
    np.testing.assert_array_equal(next_draws, whole_next_draws)  # what the test bags draw


# ----------------------------------------------------------------------------- kill tests


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return env


def _kill_after_first_epoch(command: list[str], state_dir: Path, log_path: Path) -> int:
    """Start ``command``, SIGKILL it as soon as its state records a finished epoch; return
    the number of epochs saved."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=log
        )
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and process.poll() is None:
                info = state_dir / STATE_INFO
                if info.is_file() and json.loads(info.read_text())["epochs_done"] >= 1:
                    break
                time.sleep(0.005)
        finally:
            process.send_signal(signal.SIGKILL)  # also when the run failed or took too long
            process.wait()
    assert process.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
    return saved_epochs(state_dir)


def _run(command: list[str]) -> str:
    result = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _assert_same_fold_files(resumed: Path, whole: Path, tables: list[str]) -> None:
    for name in tables:
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
    logs = [
        pd.read_csv(d / "train_log.tsv", sep="\t").drop(columns="seconds") for d in (resumed, whole)
    ]
    pd.testing.assert_frame_equal(*logs)
    assert_same_weights(
        load_file(str(resumed / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    )


def _with_longer_runtime(settings: dict) -> dict:
    """The settings of a rerun after a time-out: more time (resources never block a resume)."""
    longer = json.loads(json.dumps(settings))
    for method in longer["methods"].values():
        method["resources"]["runtime"] *= 2
    return longer


def _kill_rerun_compare(command_for, settings: dict, tmp_path: Path, tables: list[str]) -> None:
    """Run uninterrupted; run, kill and rerun (with a longer runtime); compare the files."""
    whole, resumed = tmp_path / "whole" / "fold_0", tmp_path / "resumed" / "fold_0"
    _run(command_for(whole, settings))
    state_dir = state_dir_beside(resumed)
    killed = command_for(resumed, settings)
    done = _kill_after_first_epoch(killed, state_dir, tmp_path / "killed.log")
    assert not resumed.exists() and done >= 1
    print(f"killed after epoch {done}")
    log = _run(command_for(resumed, _with_longer_runtime(settings)))
    assert f"resuming from {state_dir} after epoch {done}" in log
    assert not state_dir.exists()  # removed once the fold folder is written
    _assert_same_fold_files(resumed, whole, tables)
    assert sorted(p.name for p in resumed.parent.iterdir()) == ["fold_0"]


def test_a_killed_cmus_fold_command_resumes_to_the_same_files(tiny_fold, tmp_path):  # noqa: F811
    _, manifest, splits, settings_json = tiny_fold
    settings = json.loads(settings_json)
    settings["methods"]["cmus"]["train"] |= {"epochs": 6, "restore_best": True}

    def command_for(out: Path, settings: dict) -> list[str]:
        return [
            sys.executable, "-m", "mmdiag", "cmus", "train", "--method", "cmus",
            "--variant", "cmus_net", "--fold", "0", "--manifest", str(manifest),
            "--splits", str(splits), "--out", str(out), "--threads", "1",
            "--settings-json", json.dumps(settings),
        ]  # fmt: skip

    _kill_rerun_compare(command_for, settings, tmp_path, ["predictions.tsv", "metrics.tsv"])


def test_a_killed_csmil_fold_command_resumes_to_the_same_files(cohort, tmp_path):  # noqa: F811
    method = _method({"csmil": None})
    method["train"] |= {"epochs": 30}
    settings = {"methods": {"csmil": method}, "manifest": {"classes": ["negative", "positive"]}}

    def command_for(out: Path, settings: dict) -> list[str]:
        return [
            sys.executable, "-m", "mmdiag", "csmil", "train", "--method", "csmil",
            "--variant", "csmil", "--fold", "0", "--manifest", str(cohort["manifest"]),
            "--splits", str(cohort["splits"]), "--clusters", str(cohort["clusters"]),
            "--out-dir", str(out), "--settings-json", json.dumps(settings),
            *[str(p) for p in cohort["stores"]],
        ]  # fmt: skip

    tables = ["predictions.tsv", "metrics.tsv", "attention.tsv"]
    _kill_rerun_compare(command_for, settings, tmp_path, tables)


if __name__ == "__main__":
    _two_process_worker(Path(sys.argv[1]))
