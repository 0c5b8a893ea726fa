"""Deep multimodal guidance (Mallya & Hamarneh, MICCAI 2022): CLAM-SB, the 3D DenseNet, the
2D multi-task CNN, the guidance model G (eq. 4) and the guided classifier F (eq. 5)."""

import copy
import math

import pytest
import torch
from safetensors.torch import save_model
from torch import nn
from torch.nn import functional as F

from mmdiag.models import create_model
from mmdiag.models.guide import (
    DERM7PT_GUIDANCE,
    RADPATH_GUIDANCE,
    ClamSB,
    DenseNetVolumeClassifier,
    GuidanceFit,
    GuidanceModel,
    GuidedClassifier,
    ImageClassifier2D,
    LatentLinear,
    guidance_loss,
)
from mmdiag.training.stages import load_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- CLAM-SB

# five patches; the first feature orders the attention: top-2 are patches 1 and 3,
# bottom-2 are patches 0 and 4
_BAG = torch.tensor(
    [[0.1, 0.7, 0.2], [2.0, 0.1, 0.9], [0.5, 0.4, 0.3], [1.5, 1.2, 0.1], [0.3, 0.2, 0.8]]
)
# instance classifier c's logit(1) - logit(0) = a_c h_0 + b_c h_1, (a_c, b_c) per class
_DIFFERENCES = [(1.0, -2.0), (0.5, 1.0), (-1.0, 0.3)]


def _monotone_clam(subtyping: bool = True) -> ClamSB:
    """A CLAM-SB whose attention score of a patch is 0.5 tanh(x_0): identity embedding, gate
    fixed at sigmoid(0) = 1/2, and instance classifiers with hand-set logit differences."""
    model = ClamSB(3, 3, hidden_dim=3, attention_dim=3, dropout=0.0, k_sample=2)
    model.subtyping = subtyping
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.fc[0].weight.copy_(torch.eye(3))
        model.attention.attention_a[0].weight.copy_(torch.eye(3))
        model.attention.attention_c.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        for classifier, (a, b) in zip(model.instance_classifiers, _DIFFERENCES, strict=True):
            classifier.weight[1, :2] = torch.tensor([a, b])
        model.classifier.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]))
    return model.eval()


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _hand_instance_loss(label: int, subtyping: bool) -> float:
    """CLAM's instance loss of ``_BAG`` by hand: CE of target 1 is softplus(-d), of 0 is
    softplus(d), with d the classifier's logit difference."""
    top, bottom = [1, 3], [0, 4]

    def difference(c, patch):
        a, b = _DIFFERENCES[c]
        return a * _BAG[patch, 0].item() + b * _BAG[patch, 1].item()

    in_class = [_softplus(-difference(label, p)) for p in top]
    in_class += [_softplus(difference(label, p)) for p in bottom]
    terms = [sum(in_class) / 4]
    if subtyping:
        for c in range(3):
            if c != label:
                terms.append(sum(_softplus(difference(c, p)) for p in top) / 2)
    return sum(terms) / len(terms)


def _hand_bag_loss(label: int) -> float:
    scores = [0.5 * math.tanh(x) for x in _BAG[:, 0].tolist()]
    weights = [math.exp(s) for s in scores]
    attention = [w / sum(weights) for w in weights]
    latent = [sum(a * _BAG[k, j].item() for k, a in enumerate(attention)) for j in range(3)]
    # D_S is the identity here: the logits are z_S itself
    return -latent[label] + math.log(sum(math.exp(v) for v in latent))


def _one_bag_batch(bag: torch.Tensor, label: int) -> dict[str, torch.Tensor]:
    return {
        "features": bag[None],
        "n_patches": torch.tensor([len(bag)]),
        "label": torch.tensor([label]),
    }


@pytest.mark.parametrize("subtyping", [True, False])
def test_clam_instance_and_total_loss_match_a_hand_computation(subtyping):
    model = _monotone_clam(subtyping)
    latent, attention = model.encode(_BAG)
    assert attention.topk(2).indices.tolist() == [1, 3]
    for label in range(3):
        total, logits, terms = model.loss(_one_bag_batch(_BAG, label))
        expected_instance = _hand_instance_loss(label, subtyping)
        expected_bag = _hand_bag_loss(label)
        assert terms["instance"].item() == pytest.approx(expected_instance, rel=1e-5)
        assert terms["bag"].item() == pytest.approx(expected_bag, rel=1e-5)
        assert total.item() == pytest.approx(0.7 * expected_bag + 0.3 * expected_instance, 1e-5)
        torch.testing.assert_close(logits[0], latent)
    # the out-of-class terms change the loss: subtyping and not differ
    other = _monotone_clam(not subtyping).loss(_one_bag_batch(_BAG, 1))[2]["instance"]
    assert other.item() != pytest.approx(_hand_instance_loss(1, subtyping), rel=1e-3)


def test_clam_small_bags_take_half_their_patches_and_single_patches_none():
    model = ClamSB(4, 3, hidden_dim=8, attention_dim=4, k_sample=8)
    assert [model.n_instances(n) for n in (1, 2, 3, 7, 16, 100)] == [0, 1, 1, 3, 8, 8]
    single = {
        "features": torch.randn(2, 1, 4),
        "n_patches": torch.tensor([1, 1]),
        "label": torch.tensor([0, 2]),
    }
    total, _, terms = model.loss(single)
    assert terms["instance"].item() == 0.0
    assert total.item() == pytest.approx(0.7 * terms["bag"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="n_patches"):
        model(dict(single, n_patches=torch.tensor([0, 1])))


def test_clam_padding_changes_nothing_and_attention_covers_real_patches_only():
    torch.manual_seed(0)
    model = ClamSB(6, 3, hidden_dim=16, attention_dim=8).eval()
    short, long = torch.randn(4, 6), torch.randn(7, 6)
    features = torch.zeros(2, 7, 6)
    features[0, :4], features[1] = short, long
    features[0, 4:] = 50.0  # whatever sits in the padding is ignored
    batch = {"features": features, "n_patches": torch.tensor([4, 7]), "label": torch.tensor([0, 1])}
    with torch.no_grad():
        padded = model(batch)
        torch.testing.assert_close(padded[0], model(_one_bag_batch(short, 0))[0])
        torch.testing.assert_close(padded[1], model(_one_bag_batch(long, 1))[0])
        latent, attention = model.encode(short)
    assert attention.shape == (4,) and (attention > 0).all()
    assert attention.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert latent.shape == (model.latent_dim,) == (16,)


def _planted_bags(n_bags: int, generator: torch.Generator, directions: torch.Tensor):
    """Bags of 12 noise patches; in each, 3 patches carry 3x the direction of its class."""
    labels = torch.randint(0, 3, (n_bags,), generator=generator)
    counts = torch.randint(8, 13, (n_bags,), generator=generator)
    features = torch.randn(n_bags, 12, directions.shape[1], generator=generator)
    for bag, (label, count) in enumerate(zip(labels, counts, strict=True)):
        features[bag, :3] += 3.0 * directions[label]
        features[bag, count:] = 0.0
        features[bag, :count] = features[bag, torch.randperm(int(count), generator=generator)]
    return {"features": features, "n_patches": counts, "label": labels}


def test_clam_learns_a_planted_patch_signal():
    generator = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(16, 3, generator=generator))[0].T  # orthonormal
    train = _planted_bags(96, generator, directions)
    held_out = _planted_bags(60, generator, directions)
    torch.manual_seed(0)
    model = ClamSB(16, 3, hidden_dim=32, attention_dim=16, k_sample=3)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(300):
        rows = torch.arange(step * 8, step * 8 + 8) % 96
        batch = {key: value[rows] for key, value in train.items()}
        optimiser.zero_grad()
        model.loss(batch)[0].backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        logits = model(held_out)
        torch.testing.assert_close(model.decode(model.encode_batch(held_out)), logits)
        first = held_out["features"][0, : held_out["n_patches"][0]]
        torch.testing.assert_close(model.decode(model.encode(first)[0]), logits[0])
    accuracy = (logits.argmax(1) == held_out["label"]).float().mean().item()
    # chance is 1/3 (sd about 0.06 over 60 bags): 0.9 is far beyond it, and the planted
    # signal is strong enough that a learning model gets 0.97-1.0 over seeds 0-4
    assert accuracy > 0.9, accuracy


# --------------------------------------------------------------------------- 3D DenseNet

_TINY_DENSENET = {"init_features": 4, "growth_rate": 4, "block_config": (2, 2)}


def test_densenet121_latent_is_1024_wide():
    torch.manual_seed(0)
    model = DenseNetVolumeClassifier(1, 3).eval()
    assert model.latent_dim == 1024
    with torch.no_grad():
        latent = model.encode(torch.randn(1, 1, 32, 32, 32))
    assert latent.shape == (1, 1024) and (latent >= 0).all()  # pooled after a ReLU


def test_densenet_decode_of_encode_is_forward_and_eval_ignores_the_batch():
    torch.manual_seed(0)
    model = DenseNetVolumeClassifier(2, 3, **_TINY_DENSENET)
    volumes = torch.randn(4, 2, 16, 16, 16)
    model.train()
    model({"volume": volumes})  # move the running statistics off their initial values
    with torch.no_grad():
        in_batch = model({"volume": volumes})
        alone = model({"volume": volumes[:1]})
    # in training mode batch norm uses the batch's statistics: the check below can fail
    assert not torch.allclose(in_batch[0], alone[0], atol=1e-4)
    model.eval()
    with torch.no_grad():
        in_batch = model({"volume": volumes})
        alone = model({"volume": volumes[:1]})
        torch.testing.assert_close(model.decode(model.encode(volumes)), in_batch)
    torch.testing.assert_close(alone[0], in_batch[0], rtol=1e-5, atol=1e-5)
    assert (
        in_batch.shape == (4, 3) and model.latent_dim == (4 + 2 * 4) // 2 + 2 * 4
    )  # a transition halves


def test_densenet_checkpointing_gives_the_same_outputs_gradients_and_statistics():
    torch.manual_seed(0)
    plain = DenseNetVolumeClassifier(1, 3, dropout=0.2, **_TINY_DENSENET).train()
    recomputed = copy.deepcopy(plain)
    recomputed.checkpointing = True
    volumes = torch.randn(3, 1, 16, 16, 16)
    outputs, block_runs = [], []
    for model in (plain, recomputed):
        runs = []
        model.features.denseblock1.register_forward_pre_hook(lambda *_, runs=runs: runs.append(1))
        torch.manual_seed(1)  # the same dropout masks
        logits = model({"volume": volumes})
        F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
        outputs.append(logits)
        block_runs.append(len(runs))
    assert block_runs == [1, 2]  # checkpointing recomputes the block in the backward pass
    torch.testing.assert_close(outputs[0], outputs[1])
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        assert b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # the recomputation in the backward pass does not move the batch-norm statistics again
    for (name, a), b in zip(plain.named_buffers(), recomputed.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


# --------------------------------------------------------------------------- 2D multi-task CNN

_TASKS = {"diagnosis": 5, "pn": 3, "bwv": 2}


def _image_batch():
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(4, 3, 32, 32, generator=generator),
        "label": torch.tensor([0, 4, 2, 1]),
        "labels_pn": torch.tensor([2, 0, 1, 1]),
        "labels_bwv": torch.tensor([1, 0, 0, 1]),
    }


def test_image_classifier_has_one_head_per_task():
    model = ImageClassifier2D("test_convnext", _TASKS).eval()
    assert model.tasks == ("diagnosis", "pn", "bwv")
    for task, n_classes in _TASKS.items():
        assert model.heads[task].in_features == model.latent_dim == model.encoder.num_features
        assert model.heads[task].out_features == n_classes
    batch = _image_batch()
    with torch.no_grad():
        logits = model.forward_tasks(batch)
        assert {task: tuple(v.shape) for task, v in logits.items()} == {
            task: (4, n) for task, n in _TASKS.items()
        }
        torch.testing.assert_close(model(batch), logits["diagnosis"])
        decoded = model.decode(model.encode(batch["image"]))
    for task in _TASKS:
        torch.testing.assert_close(decoded[task], logits[task])


def test_image_classifier_loss_is_the_sum_of_the_task_cross_entropies():
    model = ImageClassifier2D("test_convnext", _TASKS).eval()
    batch = _image_batch()
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    total, first, terms = model.loss(batch, class_weight=weight)
    logits = model.forward_tasks(batch)
    labels = {"diagnosis": batch["label"], "pn": batch["labels_pn"], "bwv": batch["labels_bwv"]}
    expected = {}
    for task, y in labels.items():
        picked = -torch.log_softmax(logits[task], dim=1)[torch.arange(4), y]
        w = weight[y] if task == "diagnosis" else torch.ones(4)  # weights: first task only
        expected[task] = (w * picked).sum() / w.sum()
    for task in _TASKS:
        torch.testing.assert_close(terms[task], expected[task])
    torch.testing.assert_close(total, sum(expected.values()))
    torch.testing.assert_close(first, logits["diagnosis"])
    with pytest.raises(KeyError, match="labels_bwv"):
        model.loss({k: v for k, v in batch.items() if k != "labels_bwv"})


# --------------------------------------------------------------------------- G (eq. 4)


def _linear_dims(model: GuidanceModel) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def test_guidance_model_has_the_papers_layers():
    radpath = GuidanceModel(**RADPATH_GUIDANCE)
    assert _linear_dims(radpath) == [(1024, 512), (512, 256), (256, 256), (256, 512)]
    derm7pt = GuidanceModel(**DERM7PT_GUIDANCE)
    assert _linear_dims(derm7pt) == [
        (2048, 1024),
        (1024, 512),
        (512, 512),
        (512, 1024),
        (1024, 2048),
    ]
    # Linear, ReLU, Dropout for every hidden layer; the output Linear, then ReLU
    assert [type(m) for m in radpath.hidden] == [nn.Linear, nn.ReLU, nn.Dropout] * 3
    assert all(m.p == 0.25 for m in radpath.hidden if isinstance(m, nn.Dropout))
    assert type(radpath.output_activation) is nn.ReLU
    assert type(GuidanceModel(8, 4, output_relu=False).output_activation) is nn.Identity
    assert radpath.state_dict()[GuidanceModel.OUTPUT_KEY].shape == (512, 256)


def test_guidance_output_is_non_negative_only_with_output_relu():
    torch.manual_seed(0)
    z = 3.0 * torch.randn(64, 16)
    with_relu = GuidanceModel(16, 8, hidden_dims=(12,)).eval()
    without = GuidanceModel(16, 8, hidden_dims=(12,), output_relu=False).eval()
    without.load_state_dict(with_relu.state_dict())
    with torch.no_grad():
        assert (with_relu(z) >= 0).all()
        raw = without(z)
        assert (raw < 0).any()
        torch.testing.assert_close(with_relu(z), raw.clamp(min=0))


def test_guidance_model_learns_a_linear_map():
    generator = torch.Generator().manual_seed(0)
    # a rank-4 map, which fits through the bottleneck of 8
    mapping = torch.randn(16, 4, generator=generator) @ torch.randn(4, 12, generator=generator)
    z_train, z_test = torch.randn(512, 16, generator=generator), torch.randn(128, 16)
    torch.manual_seed(0)
    model = GuidanceModel(16, 12, hidden_dims=(64, 8, 64), dropout=0.0, output_relu=False)
    with torch.no_grad():
        before = guidance_loss(model(z_test), z_test @ mapping).item()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(400):
        rows = torch.arange(step * 64, step * 64 + 64) % 512
        optimiser.zero_grad()
        guidance_loss(model(z_train[rows]), z_train[rows] @ mapping).backward()
        optimiser.step()
    with torch.no_grad():
        after = guidance_loss(model(z_test), z_test @ mapping).item()
    assert after < before / 20, (before, after)


def test_guidance_loss_is_the_mean_squared_error_and_checks_shapes():
    z_hat, z = torch.tensor([[1.0, 2.0], [0.0, 4.0]]), torch.tensor([[0.0, 2.0], [2.0, 1.0]])
    assert guidance_loss(z_hat, z).item() == pytest.approx((1 + 0 + 4 + 9) / 4)
    with pytest.raises(ValueError, match="one shape"):
        guidance_loss(z_hat, z[:, :1])


# --------------------------------------------------------------------------- F (eq. 5)


def test_guided_classifier_puts_the_guidance_output_first():
    torch.manual_seed(0)
    guidance = GuidanceModel(3, 2, hidden_dims=(4,), output_relu=False)
    model = GuidedClassifier(guidance, inferior_dim=3, n_classes=2)
    z_inferior = torch.randn(5, 3)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0]]))
        model.classifier.bias.zero_()
        logits = model(z_inferior)
        guided = guidance(z_inferior)
    # row 0 reads the first entry of the concatenation, row 1 the third
    torch.testing.assert_close(logits[:, 0], guided[:, 0])
    torch.testing.assert_close(logits[:, 1], z_inferior[:, 0])
    assert not torch.allclose(guided[:, 0], z_inferior[:, 0])
    torch.testing.assert_close(model({"z_inferior": z_inferior}), logits)


def test_guided_classifier_trains_only_its_decoder_and_keeps_g_in_eval_mode():
    torch.manual_seed(0)
    guidance = GuidanceModel(6, 4, hidden_dims=(8,), dropout=0.5)
    model = GuidedClassifier(guidance, inferior_dim=6, n_classes=3).train()
    assert not guidance.training and model.classifier.training
    assert all(not p.requires_grad for p in guidance.parameters())
    before = copy.deepcopy(guidance.state_dict())
    decoder_before = model.classifier.weight.detach().clone()
    batch = {"z_inferior": torch.randn(8, 6), "label": torch.randint(0, 3, (8,))}
    # every parameter given to the optimiser, with weight decay: G must still not move
    optimiser = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    F.cross_entropy(model(batch), batch["label"]).backward()
    optimiser.step()
    assert all(p.grad is None for p in guidance.parameters())
    for key, value in guidance.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert not torch.equal(model.classifier.weight, decoder_before)
    # dropout is off in G: two calls in training mode agree
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(batch))
    with pytest.raises(ValueError, match="inferior_dim"):
        GuidedClassifier(GuidanceModel(6, 4), inferior_dim=5, n_classes=3)


def test_guided_classifier_loads_g_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = GuidanceModel(6, 4, hidden_dims=(8,))
    path = tmp_path / "guidance.safetensors"
    save_model(trained, str(path))
    model = create_model(
        "guided_classifier",
        inferior_dim=6,
        superior_dim=4,
        n_classes=3,
        hidden_dims=(8,),
        guidance_checkpoint=str(path),
    )
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(model.guidance.state_dict()[key], value)
    assert all(not p.requires_grad for p in model.guidance.parameters())


# --------------------------------------------------------------------------- step 2 and heads


def test_guidance_fit_trains_g_by_mse_and_reports_the_superior_decoders_logits(tmp_path):
    torch.manual_seed(0)
    clam = ClamSB(5, 3, hidden_dim=6, attention_dim=4)
    decoder = nn.Linear(6, 3)
    decoder.load_state_dict(
        {
            k.removeprefix(ClamSB.DECODER_PREFIX): v
            for k, v in clam.state_dict().items()
            if k.startswith(ClamSB.DECODER_PREFIX)
        }
    )
    model = GuidanceFit(GuidanceModel(8, 6, hidden_dims=(5,), dropout=0.0), decoder).train()
    batch = {"z_inferior": torch.randn(4, 8), "z_superior": torch.rand(4, 6)}
    loss, logits = model.loss(batch)
    z_hat = model.guidance(batch["z_inferior"])
    assert loss.item() == pytest.approx(((z_hat - batch["z_superior"]) ** 2).mean().item())
    torch.testing.assert_close(logits, clam.decode(z_hat))
    torch.testing.assert_close(model({"z_inferior": batch["z_inferior"]}), logits)
    loss.backward()
    assert all(p.grad is not None for p in model.guidance.parameters())
    assert all(not p.requires_grad for p in model.superior_decoder.parameters())
    assert not model.superior_decoder.training
    # the step-2 checkpoint gives G back under its prefix
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))
    again = load_stage(
        GuidanceModel(8, 6, hidden_dims=(5,)), path, prefix=GuidanceFit.GUIDANCE_PREFIX
    )
    for key, value in model.guidance.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)


def test_latent_linear_is_one_linear_layer_on_z():
    torch.manual_seed(0)
    model = LatentLinear(5, 3)
    z = torch.randn(4, 5)
    expected = z @ model.classifier.weight.T + model.classifier.bias
    torch.testing.assert_close(model({"z": z}), expected)
    torch.testing.assert_close(model(z), expected)


def _tiny_densenet(**options):
    torch.manual_seed(0)
    return DenseNetVolumeClassifier(
        2, 3, init_features=4, growth_rate=4, block_config=(1, 1), **options
    ).eval()


def test_densenet_precision_bf16_autocasts_and_returns_float32():
    volume = torch.randn(2, 2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    reference = _tiny_densenet(precision="fp32")
    bf16 = _tiny_densenet(precision="bf16")
    with torch.no_grad():
        exact, approximate = reference.encode(volume), bf16.encode(volume)
        # auto is fp32 on the CPU: bit-identical to fp32
        torch.testing.assert_close(_tiny_densenet(precision="auto").encode(volume), exact)
    assert approximate.dtype == torch.float32
    assert not torch.equal(approximate, exact)  # the encoder did run in bfloat16
    torch.testing.assert_close(approximate, exact, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="precision 'half' is not one of"):
        DenseNetVolumeClassifier(1, 3, precision="half")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_densenet_on_cuda_autocasts_channels_last_and_matches_fp32():
    volume = torch.randn(2, 2, 16, 16, 16, generator=torch.Generator().manual_seed(1)).cuda()
    reference = _tiny_densenet(precision="fp32", channels_last=False).cuda()
    model = _tiny_densenet().cuda()
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode(volume), reference.encode(volume), rtol=0.05, atol=0.05
        )
