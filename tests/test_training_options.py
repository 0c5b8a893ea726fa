"""The training loop's options: optimisers, schedules, model selection, class balance, the
step hook, frozen stages and batch-coupled losses under data parallelism.

Run as a module (``python -m tests.test_training_options OUT``, alone or under torchrun), this
file is also the worker of the 1- versus 2-process comparison of a Gram-matrix loss.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from mmdiag.training.distributed import (
    all_gather_with_grad,
    init_distributed,
    shutdown,
    unwrap,
)
from mmdiag.training.loop import SEED_RANGE, TrainSettings, batch_indices, train_model
from mmdiag.training.sampling import (
    balanced_class_weights,
    epoch_order,
    weighted_cross_entropy,
)
from mmdiag.training.stages import freeze, load_stage

from .test_distributed_training import _run_module, _torchrun


@dataclass(frozen=True)
class Sample:
    index: int
    label: int
    x: torch.Tensor


def make_samples(labels, seed=0, dtype=torch.float32) -> list[Sample]:
    """Samples whose 4 features are noise plus a class-dependent shift."""
    generator = torch.Generator().manual_seed(seed)
    return [
        Sample(i, int(y), torch.randn(4, generator=generator, dtype=dtype) + y)
        for i, y in enumerate(labels)
    ]


def collate(samples, generators=None) -> dict[str, torch.Tensor]:
    return {
        "x": torch.stack([s.x for s in samples]),
        "label": torch.tensor([s.label for s in samples]),
        "index": torch.tensor([s.index for s in samples]),
    }


class Linear(nn.Module):
    """Logits of the features; trained with the loop's cross-entropy (no ``loss``)."""

    def __init__(self, n_classes: int = 3, dtype=torch.float32) -> None:
        super().__init__()
        self.fc = nn.Linear(4, n_classes, dtype=dtype)

    def forward(self, batch):
        return self.fc(batch["x"])


def settings(**overrides) -> TrainSettings:
    base = dict(epochs=2, batch_size=4, lr=0.05, lr_min=0.0, weight_decay=0.0, device="cpu")
    return TrainSettings(**(base | overrides))


LABELS = [0, 1, 2] * 4


# settings ---------------------------------------------------------------------------------


def test_defaults_keep_adam_cosine_and_the_last_epoch():
    defaults = settings()
    assert (defaults.optimizer, defaults.scheduler, defaults.sampler) == (
        "adam",
        "cosine",
        "shuffle",
    )
    assert defaults.class_weights == "none" and defaults.early_stopping_patience is None
    assert not defaults.restore_best and not defaults.selects_model


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer": "rmsprop"}, "optimizer 'rmsprop'"),
        ({"scheduler": "step"}, "scheduler 'step'"),
        ({"sampler": "weighted"}, "sampler 'weighted'"),
        ({"nesterov": True}, "nesterov needs the sgd optimizer"),
        ({"optimizer": "sgd", "momentum": 0.0, "nesterov": True}, "positive momentum"),
        ({"optimizer": "sgd", "amsgrad": True}, "amsgrad"),
        ({"monitor": "test_loss"}, "not a validation value"),
        ({"monitor_mode": "lowest"}, "monitor_mode"),
        ({"class_weights": "inverse"}, "class_weights 'inverse'"),
        ({"class_weights": [1.0, -1.0]}, "must be positive"),
        ({"plateau_factor": 1.0}, "plateau_factor"),
        ({"early_stopping_patience": 0}, "at least 1"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        settings(**overrides)


def test_a_weight_list_from_the_config_becomes_a_tuple():
    assert settings(class_weights=[1, 2.5]).class_weights == (1.0, 2.5)


def test_default_training_is_the_reference_adam_cosine_loop():
    """Defaults reproduce, bit for bit, the plain loop: seeded permutation, per-sample seeds,
    Adam, cosine annealing, the last epoch's weights."""
    samples, chosen = make_samples(LABELS), settings(epochs=3, batch_size=5, lr_min=1e-3)
    torch.manual_seed(0)
    model, reference = Linear(), Linear()
    reference.load_state_dict(model.state_dict())
    history = train_model(model, samples, collate, chosen, val_samples=samples[:3])
    assert "best" not in history[-1]

    generator = torch.Generator().manual_seed(chosen.seed)
    optimiser = torch.optim.Adam(reference.parameters(), lr=chosen.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, 3, eta_min=1e-3)
    for _ in range(chosen.epochs):
        order = torch.randperm(len(samples), generator=generator)
        for indices in batch_indices(len(samples), chosen.batch_size, order):
            torch.randint(SEED_RANGE, (len(indices),), generator=generator)
            batch = collate([samples[i] for i in indices])
            loss = nn.functional.cross_entropy(reference(batch), batch["label"])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        scheduler.step()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


# optimiser and schedules ------------------------------------------------------------------


def _loss_gradient(model: nn.Module, samples) -> dict[str, torch.Tensor]:
    batch = collate(samples)
    model.zero_grad()
    nn.functional.cross_entropy(model(batch), batch["label"]).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_sgd_with_nesterov_momentum_follows_its_update_rule():
    """Two steps of ``b = mu b + g + wd p; p -= lr (g + wd p + mu b)``, computed by hand."""
    samples = make_samples(LABELS, dtype=torch.float64)
    torch.manual_seed(1)
    model = Linear(dtype=torch.float64)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    lr, mu, wd = 0.1, 0.9, 0.01
    chosen = settings(
        optimizer="sgd",
        momentum=mu,
        nesterov=True,
        weight_decay=wd,
        lr=lr,
        scheduler="none",
        batch_size=len(samples),
    )
    train_model(model, samples, collate, chosen)

    probe, buffers = Linear(dtype=torch.float64), {}
    for _ in range(2):
        probe.load_state_dict(params)
        grads = _loss_gradient(probe, samples)
        for name, grad in grads.items():
            grad = grad + wd * params[name]
            buffers[name] = grad if name not in buffers else mu * buffers[name] + grad
            params[name] = params[name] - lr * (grad + mu * buffers[name])
    for name, tensor in params.items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-12, atol=1e-12)

    torch.manual_seed(1)
    plain = Linear(dtype=torch.float64)
    train_model(plain, samples, collate, replace(chosen, nesterov=False))
    assert not torch.allclose(plain.fc.weight, model.fc.weight)


class Scripted(nn.Module):
    """Validation logits follow a script (margin per epoch); training moves the weights.

    Each validation pass (after an epoch's training) records the weights it saw.
    """

    def __init__(self, margins) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.margins, self.epoch, self.snapshots = list(margins), 0, {}

    def train(self, mode: bool = True):
        self.epoch += int(mode)
        return super().train(mode)

    def loss(self, batch):
        logits = self.fc(batch["x"])
        return nn.functional.cross_entropy(logits, batch["label"] % 2), logits

    def forward(self, batch):
        self.snapshots[self.epoch] = {k: v.clone() for k, v in self.state_dict().items()}
        margin = self.margins[self.epoch - 1]
        return torch.tensor([[margin, 0.0]]).expand(len(batch["x"]), 2)


VAL = [Sample(100 + i, 0, torch.zeros(4)) for i in range(3)]  # label 0: loss softplus(-margin)


def test_plateau_lowers_the_lr_after_patience_epochs_without_improvement():
    chosen = settings(epochs=6, scheduler="plateau", plateau_patience=1, plateau_factor=0.5)
    flat = train_model(Scripted([1.0] * 6), make_samples(LABELS), collate, chosen, val_samples=VAL)
    assert [row["lr"] for row in flat] == pytest.approx([0.05] * 3 + [0.025] * 2 + [0.0125])
    better = train_model(
        Scripted(range(1, 7)), make_samples(LABELS), collate, chosen, val_samples=VAL
    )
    assert [row["lr"] for row in better] == [0.05] * 6
    with pytest.raises(
        ValueError, match="the plateau scheduler monitor val_loss and need validation samples"
    ):
        train_model(Scripted([1.0] * 6), make_samples(LABELS), collate, chosen)


MARGINS = [1.0, 2.0, 3.0, 2.5, 2.8, 4.0, 5.0]  # the validation loss is lowest at epoch 3 of 5


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch():
    torch.manual_seed(0)
    model = Scripted(MARGINS)
    chosen = settings(epochs=7, early_stopping_patience=2, restore_best=True)
    history = train_model(model, make_samples(LABELS), collate, chosen, val_samples=VAL)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert [row["best"] for row in history] == [True, True, True, False, False]
    losses = [row["val_loss"] for row in history]
    assert losses == pytest.approx([math.log1p(math.exp(-m)) for m in MARGINS[:5]])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, model.snapshots[3][name]), name
    assert not torch.equal(model.fc.weight, model.snapshots[5]["fc.weight"])


def test_without_restoring_the_last_epoch_stays_and_accuracy_can_be_monitored():
    model = Scripted(MARGINS)
    chosen = settings(epochs=7, early_stopping_patience=1, monitor="val_acc", monitor_mode="max")
    history = train_model(model, make_samples(LABELS), collate, chosen, val_samples=VAL)
    # the accuracy is 1 from the first epoch on: the second epoch brings no improvement
    assert [row["best"] for row in history] == [True, False]
    assert torch.equal(model.fc.weight, model.snapshots[2]["fc.weight"])


def test_a_validation_callback_replaces_the_loss_and_selects_the_epoch():
    scores = [0.2, 0.9, 0.4, 0.5]  # the caller's own validation value peaks at epoch 2
    seen = []

    def validate(model, samples):
        seen.append((model.training, torch.is_grad_enabled(), len(samples)))
        model(collate(samples))  # records the weights this epoch ended with
        return {"val_score": scores[model.epoch - 1]}

    model = Scripted([1.0] * 4)
    chosen = settings(epochs=4, restore_best=True, monitor="val_score", monitor_mode="max")
    history = train_model(
        model, make_samples(LABELS), collate, chosen, val_samples=VAL, validate=validate
    )
    assert [row["val_score"] for row in history] == scores
    assert "val_loss" not in history[0] and "val_acc" not in history[0]
    assert [row["best"] for row in history] == [True, True, False, False]
    assert seen == [(False, False, len(VAL))] * 4
    assert torch.equal(model.fc.weight, model.snapshots[2]["fc.weight"])
    assert not torch.equal(model.fc.weight, model.snapshots[4]["fc.weight"])


# class balance ----------------------------------------------------------------------------


def test_balanced_class_weights_follow_n_over_k_n_c():
    weights = balanced_class_weights(torch.tensor([0, 0, 0, 1, 2, 2]))
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 2.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"classes \[1\] have no training sample"):
        balanced_class_weights(torch.tensor([0, 2, 2]))


@pytest.mark.parametrize("class_weights", ["none", "balanced", [1.0, 3.0, 0.5]])
def test_the_weighted_loss_is_the_mean_of_weighted_sample_losses(class_weights):
    labels = [0] * 6 + [1] * 3 + [2]
    samples = make_samples(labels)
    torch.manual_seed(0)
    model = Linear()
    batch = collate(samples)
    with torch.no_grad():
        per_sample = nn.functional.cross_entropy(model(batch), batch["label"], reduction="none")
    weights = {
        "none": torch.ones(3),
        "balanced": torch.tensor([10 / 18, 10 / 9, 10 / 3]),
        "list": torch.tensor([1.0, 3.0, 0.5]),
    }[class_weights if isinstance(class_weights, str) else "list"]
    chosen = settings(epochs=1, batch_size=len(samples), class_weights=class_weights)
    history = train_model(model, samples, collate, chosen)
    expected = (per_sample * weights[batch["label"]]).mean().item()
    assert history[0]["train_loss"] == pytest.approx(expected, rel=1e-6)
    if class_weights != "none":
        assert expected != pytest.approx(per_sample.mean().item(), rel=1e-3)


class WeightedLoss(Linear):
    """A model's own loss that takes the loop's class weights."""

    seen: list[torch.Tensor]

    def loss(self, batch, class_weight=None):
        self.seen = [*getattr(self, "seen", []), class_weight]
        logits = self(batch)
        return weighted_cross_entropy(logits, batch["label"], class_weight), logits


def test_class_weights_come_from_the_training_labels_only():
    model = WeightedLoss()
    train, val = make_samples([0, 0, 0, 1, 2, 2]), make_samples([2] * 5 + [0, 1])
    train_model(model, train, collate, settings(class_weights="balanced"), val_samples=val)
    expected = torch.tensor([2 / 3, 2.0, 1.0], dtype=torch.float64)
    assert all(torch.equal(seen, expected) for seen in model.seen)


def test_class_weights_need_a_loss_that_accepts_them():
    class OwnLoss(Linear):
        def loss(self, batch):
            logits = self(batch)
            return nn.functional.cross_entropy(logits, batch["label"]), logits

    with pytest.raises(ValueError, match="takes no class_weight"):
        train_model(OwnLoss(), make_samples(LABELS), collate, settings(class_weights="balanced"))


IMBALANCED = [0] * 24 + [1] * 6 + [2] * 2


def test_the_balanced_sampler_draws_classes_uniformly_with_replacement():
    labels = torch.tensor(IMBALANCED)
    generator = torch.Generator().manual_seed(0)
    orders = torch.stack(
        [epoch_order(len(labels), generator, sampler="balanced", labels=labels) for _ in range(300)]
    )
    frequencies = torch.bincount(labels[orders.flatten()]).double() / orders.numel()
    torch.testing.assert_close(frequencies, torch.full((3,), 1 / 3).double(), rtol=0, atol=0.01)
    assert all(len(order.unique()) < len(labels) for order in orders[:10])  # with replacement
    again = epoch_order(
        len(labels), torch.Generator().manual_seed(0), sampler="balanced", labels=labels
    )
    assert torch.equal(again, orders[0])  # the seed fixes the order
    shuffled = epoch_order(len(labels), torch.Generator().manual_seed(0))
    assert sorted(shuffled.tolist()) == list(range(len(labels)))


def test_training_with_the_balanced_sampler_sees_every_class_equally_often():
    seen = []

    def recording(samples, generators):
        seen.extend(s.label for s in samples)
        return collate(samples)

    chosen = settings(epochs=40, batch_size=8, sampler="balanced")
    train_model(Linear(), make_samples(IMBALANCED), recording, chosen)
    frequencies = torch.bincount(torch.tensor(seen)).double() / len(seen)
    assert len(seen) == 40 * len(IMBALANCED)
    torch.testing.assert_close(frequencies, torch.full((3,), 1 / 3).double(), rtol=0, atol=0.03)


# the step hook ----------------------------------------------------------------------------


def test_a_hook_sees_the_gradients_and_can_hold_a_parameter_still():
    samples = make_samples(LABELS)
    torch.manual_seed(0)
    model = Linear()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    probe = Linear()
    probe.load_state_dict(initial)
    expected = _loss_gradient(probe, samples)
    calls = []

    def hold_bias(hooked, batch, terms):
        assert hooked is model and terms == {} and set(batch) == {"x", "label", "index"}
        calls.append({n: p.grad.clone() for n, p in hooked.named_parameters()})
        hooked.fc.bias.grad.zero_()

    chosen = settings(epochs=3, batch_size=len(samples))
    train_model(model, samples, collate, chosen, before_step=hold_bias)
    assert len(calls) == 3
    for name, grad in expected.items():
        torch.testing.assert_close(calls[0][name], grad)
    assert torch.equal(model.fc.bias, initial["fc.bias"])
    assert not torch.equal(model.fc.weight, initial["fc.weight"])


class TwoTerms(Linear):
    """A loss of two named terms."""

    def loss(self, batch):
        logits = self(batch)
        ce = nn.functional.cross_entropy(logits, batch["label"])
        penalty = 0.1 * (self.fc.weight**2).sum()
        return ce + penalty, logits, {"ce": ce, "penalty": penalty}


def test_a_hook_can_take_the_gradient_of_each_loss_term():
    model, checked = TwoTerms(), []

    def per_term(hooked, batch, terms):
        parameters = list(hooked.parameters())
        grads = [
            torch.autograd.grad(terms[k], parameters, retain_graph=True, allow_unused=True)
            for k in ("ce", "penalty")
        ]
        ce, penalty = grads
        torch.testing.assert_close(ce[0] + penalty[0], hooked.fc.weight.grad)
        assert penalty[1] is None  # the penalty does not involve the bias
        torch.testing.assert_close(ce[1], hooked.fc.bias.grad)
        checked.append(sorted(terms))

    train_model(model, make_samples(LABELS), collate, settings(), before_step=per_term)
    assert checked == [["ce", "penalty"]] * 6


# frozen stages ----------------------------------------------------------------------------


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)
        )

    def forward(self, batch):
        return self.net(batch["x"])


class Student(nn.Module):
    """Distils a frozen teacher: the mean squared error to its logits."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = Teacher()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, batch):
        return self.net(batch["x"])

    def loss(self, batch):
        assert not self.teacher.training
        logits = self(batch)
        return nn.functional.mse_loss(logits, self.teacher(batch)), logits


def test_a_student_learns_from_a_frozen_teacher_that_does_not_change(tmp_path):
    samples = make_samples([0, 1, 2] * 8)
    torch.manual_seed(0)
    teacher = Teacher()
    train_model(teacher, samples, collate, settings(epochs=5, batch_size=6, lr=0.02))
    path = tmp_path / "teacher.safetensors"
    save_model(teacher, str(path))

    student = Student()
    load_stage(student.teacher, path)
    assert not any(p.requires_grad for p in student.teacher.parameters())
    assert not student.train().teacher.training and not student.teacher.net[1].training
    history = train_model(student, samples, collate, settings(epochs=30, batch_size=6, lr=0.02))
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    saved = load_file(str(path))
    state = student.teacher.state_dict()
    assert saved.keys() == state.keys() and "net.1.running_mean" in saved
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


def test_a_stage_checkpoint_must_match_its_module(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_model(Teacher(), str(path))
    with pytest.raises(RuntimeError):
        load_stage(Linear(), path)
    net = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 3)
    )
    load_stage(net, path, prefix="net.")
    assert torch.equal(net[0].weight, load_file(str(path))["net.0.weight"])
    with pytest.raises(ValueError, match="no tensor under 'encoder.'"):
        load_stage(net, path, prefix="encoder.")
    with pytest.raises(FileNotFoundError):
        load_stage(net, tmp_path / "missing.safetensors")


def test_a_frozen_module_stays_in_eval_mode():
    model = Student()
    freeze(model.teacher)
    model.train()
    assert model.training and model.net.training and not model.teacher.training
    assert not any(m.training for m in model.teacher.modules())


# batch-coupled losses under data parallelism ----------------------------------------------


def test_gathering_one_process_is_the_identity():
    from mmdiag.training.loop import single_process

    tensor = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(tensor, single_process(torch.device("cpu"))) is tensor


class GramModel(nn.Module):
    """A loss with a global-batch term, the Gram matrix of all rows' features against
    same-class indicators, and a per-sample term, the cross-entropy of this process's rows;
    a frozen stem with batch norm."""

    def __init__(self, context) -> None:
        super().__init__()
        self.context = context
        self.stem = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
        self.encoder = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.3))
        self.head = nn.Linear(5, 2)
        with torch.no_grad():
            self.stem[1].running_mean.uniform_(-1, 1)
        freeze(self.stem)

    def forward(self, batch):
        return self.head(self.encoder(self.stem(batch["x"])))

    def loss(self, batch, class_weight=None):
        features = self.encoder(self.stem(batch["x"]))
        logits = self.head(features)
        every = all_gather_with_grad(features, self.context)
        labels = all_gather_with_grad(batch["label"], self.context)
        gram = every @ every.T / every.shape[1]
        same = (labels[:, None] == labels[None]).to(gram.dtype)
        ce = weighted_cross_entropy(logits, batch["label"], class_weight)
        coupled = nn.functional.mse_loss(gram, same)
        return coupled + ce, logits, {"gram": coupled, "ce": ce}


def _train_gram(out: Path) -> None:
    """Train the Gram model in float64 on 13 samples (global batches 5, 5, 3: shares 3 + 2 and
    2 + 1), with SGD, a plateau schedule, early stopping, balanced weights and sampling; save
    the weights, log, hooked gradients and (per process) the samples each batch held."""
    context = init_distributed("cpu")
    torch.manual_seed(0)
    model = GramModel(context).double()
    labels = [0] * 9 + [1] * 4
    train, val = make_samples(labels, 1, torch.float64), make_samples([0, 1] * 3, 2, torch.float64)
    held, hooked = [], []

    def recording(samples, generators):
        held.append([s.index for s in samples])
        return collate(samples)

    def hook(hooked_model, batch, terms):
        hooked.append(hooked_model.head.weight.grad.clone())
        # a term's own gradient, after DDP's backward of the total (this process's share)
        (ce_grad,) = torch.autograd.grad(terms["ce"], [hooked_model.head.weight])
        assert ce_grad.shape == hooked_model.head.weight.shape

    chosen = settings(
        epochs=6,
        batch_size=5,
        lr=0.05,
        weight_decay=1e-3,
        optimizer="sgd",
        nesterov=True,
        scheduler="plateau",
        plateau_patience=1,
        early_stopping_patience=3,
        restore_best=True,
        class_weights="balanced",
        sampler="balanced",
    )
    history = train_model(
        model, train, recording, chosen, val_samples=val, context=context, before_step=hook
    )
    (out / f"held_{context.rank}.json").write_text(json.dumps(held))
    if context.is_main:
        state = {k: v.clone() for k, v in unwrap(model).state_dict().items()}
        torch.save({"state": state, "history": history, "hooked": hooked}, out / "result.pt")
    shutdown(context)


def test_a_global_batch_loss_trains_the_same_on_two_processes(tmp_path):
    module = ["-m", "tests.test_training_options"]
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    _run_module([sys.executable], *module, str(tmp_path / "one"))
    _run_module(_torchrun(2), *module, str(tmp_path / "two"))
    one, two = (torch.load(tmp_path / name / "result.pt") for name in ("one", "two"))
    for name, tensor in one["state"].items():
        torch.testing.assert_close(two["state"][name], tensor, rtol=1e-9, atol=1e-9, msg=name)
    for row_one, row_two in zip(one["history"], two["history"], strict=True):
        row_one.pop("seconds"), row_two.pop("seconds")
        assert row_two == pytest.approx(row_one, rel=1e-9, abs=1e-9)
    for grad_one, grad_two in zip(one["hooked"], two["hooked"], strict=True):
        torch.testing.assert_close(grad_two, grad_one, rtol=1e-9, atol=1e-12)

    held = json.loads((tmp_path / "one" / "held_0.json").read_text())
    shares = [json.loads((tmp_path / "two" / f"held_{r}.json").read_text()) for r in (0, 1)]
    assert [a + b for a, b in zip(*shares, strict=True)] == held  # the same global batches
    assert [len(a) for a in shares[0][:3]] == [3, 3, 2]  # uneven shares were gathered
    epochs = [sum(held[start : start + 3], []) for start in range(0, len(held), 3)]
    assert any(len(set(epoch)) < len(epoch) for epoch in epochs)  # drawn with replacement

    torch.manual_seed(0)
    untrained = GramModel(None).double()
    assert torch.equal(one["state"]["stem.1.running_mean"], untrained.stem[1].running_mean)
    assert torch.equal(one["state"]["stem.0.weight"], untrained.stem[0].weight)
    assert not torch.allclose(one["state"]["head.weight"], untrained.head.weight)


if __name__ == "__main__":
    _train_gram(Path(sys.argv[1]))
