"""Deep multimodal guidance: an inferior modality's classifier guided by a superior one's latent.

Paper: M. Mallya and G. Hamarneh, "Deep Multimodal Guidance for Medical Image Classification",
MICCAI 2022 (Section 3, eqs. 1-5; supplementary Table 1). Authors' code:
https://github.com/mayurmallya/DeepGuide (``radpath/guidance/guidance_model.ipynb`` and
``guided_model.ipynb``; the base classifiers come from CLAM and a 3D DenseNet-121 for RadPath
and from Kawahara et al.'s Keras models for Derm7pt).

The method, in three steps (Sec. 3, Fig. 1):

1. Classifiers. C_I reads the inferior modality (MRI, clinical photographs) and C_S the
   superior one (whole-slide images, dermoscopy); each is a decoder D after an encoder E,
   y_hat = D(E(x)) with latent z = E(x) (eqs. 1-3). Every classifier here has ``encode``
   (E), ``decode`` (D) and ``latent_dim``, and ``forward`` is ``decode(encode(...))``:

   - :class:`ClamSB`, C_S of RadPath: CLAM's single-branch attention MIL over a bag of WSI
     patch features (Lu et al., "Data-efficient and weakly supervised computational pathology
     on whole-slide images", Nat. Biomed. Eng. 2021; https://github.com/mahmoodlab/CLAM);
   - :class:`DenseNetVolumeClassifier`, C_I of RadPath: MONAI's 3D DenseNet-121 on the
     stacked MRI sequences;
   - :class:`ImageClassifier2D`, C_I and C_S of Derm7pt: a timm CNN (Inception-v3 at paper
     scale, as Kawahara et al.) with one linear head per task.

2. Guidance. With both classifiers frozen, :class:`GuidanceModel` G maps z_I to an estimate of
   z_S (eq. 4), trained with the mean squared error :func:`guidance_loss`.

3. Guided classifier. :class:`GuidedClassifier` F classifies [G(z_I) ⌢ z_I] with a linear
   combined decoder D_c (eq. 5), G frozen.

Latents are computed once per step and passed on: G and F take latent vectors, so the frozen
encoders need not run again at every epoch (as in the authors' code, which saves z_I and z_S
as arrays between steps).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from mmdiag.models.encoders import create_encoder
from mmdiag.models.registry import register_model
from mmdiag.training.stages import freeze, load_stage

#: G of the RadPath experiments: DenseNet-121's z_I (1024) to CLAM's z_S (512), bottleneck 256.
RADPATH_GUIDANCE = {"in_dim": 1024, "out_dim": 512, "hidden_dims": (512, 256, 256)}
#: G of the Derm7pt experiments: Inception-v3's 2048-d latents both sides, bottleneck 512.
DERM7PT_GUIDANCE = {"in_dim": 2048, "out_dim": 2048, "hidden_dims": (1024, 512, 512, 1024)}


# --------------------------------------------------------------------------- C_S: CLAM-SB


class PatchDropout(nn.Dropout):
    """Dropout over the patches of one bag (first dimension: patches, not samples).

    The training loop swaps plain ``nn.Dropout`` layers for dropout whose masks are drawn per
    sample of the global batch (:class:`mmdiag.training.loop.GlobalBatchDropout`); CLAM's
    layers act on one bag's patches, so they keep torch's own dropout under this subclass.
    """


class GatedAttention(nn.Module):
    """CLAM's gated attention (``Attn_Net_Gated``, after Ilse et al. 2018) with one branch.

    score_k = w^T (tanh(V h_k) ⊙ sigmoid(U h_k)), with dropout on both factors as CLAM.
    """

    def __init__(self, dim: int, attention_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, attention_dim), nn.Tanh())  # V
        self.attention_b = nn.Sequential(nn.Linear(dim, attention_dim), nn.Sigmoid())  # U
        if dropout:
            self.attention_a.append(PatchDropout(dropout))
            self.attention_b.append(PatchDropout(dropout))
        self.attention_c = nn.Linear(attention_dim, 1)  # w

    def forward(self, instances: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores (N,) of instance features (N, dim)."""
        gated = self.attention_a(instances) * self.attention_b(instances)
        return self.attention_c(gated).squeeze(-1)


class ClamSB(nn.Module):
    """CLAM single-branch (``CLAM_SB``), the superior classifier C_S over a bag of patches.

    E_S: h_k = Dropout(ReLU(W x_k)), attention a = softmax_k(score_k) over the bag's patches
    (:class:`GatedAttention`) and z_S = sum_k a_k h_k (``hidden_dim``-d); D_S is a linear bag
    classifier. Training adds CLAM's instance-level clustering loss
    (:meth:`instance_loss`), so the attention learns to pick the patches that tell the class.

    Sizes are CLAM's ``size_arg="small"`` (512 hidden, 256 attention), dropout 0.25 (CLAM's
    ``--drop_out``), k = 8 (``--B``), bag weight 0.7 and subtyping (RadPath's three glioma
    classes are subtypes). A batch holds B bags zero-padded to ``N_max`` patches: ``features``
    (B, N_max, in_dim), ``n_patches`` (B,) and ``label`` (B,); each bag is cut to its real
    patches and run alone (CLAM trains with one bag per step), so padding never enters it.
    """

    #: State-dict prefix of D_S (``weight`` and ``bias``), for reading it from a checkpoint.
    DECODER_PREFIX = "classifier."

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        *,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool = True,
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        if k_sample < 1:
            raise ValueError(f"k_sample must be >= 1, got {k_sample}")
        if not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"bag_weight must be in [0, 1], got {bag_weight}")
        self.num_classes = n_classes
        self.k_sample, self.bag_weight, self.subtyping = k_sample, bag_weight, subtyping
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), PatchDropout(dropout))
        self.attention = GatedAttention(hidden_dim, attention_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)  # D_S
        # one in/out-of-class instance classifier per class
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(hidden_dim, 2) for _ in range(n_classes)
        )

    @property
    def latent_dim(self) -> int:
        """Width of z_S."""
        return self.classifier.in_features

    def _embed(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Instance features h (N, hidden), attention a (N,) and z_S (hidden,) of one bag."""
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"a bag must be (n_patches >= 1, in_dim), got {tuple(features.shape)}")
        instances = self.fc(features)
        attention = torch.softmax(self.attention(instances), dim=0)  # over the bag's patches
        return instances, attention, attention @ instances  # eq. 3: z_S = E_S(x_S)

    def encode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E_S of one unpadded bag (N, in_dim): z_S (hidden_dim,) and the attention (N,)."""
        _, attention, latent = self._embed(features)
        return latent, attention

    def encode_batch(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """z_S (B, hidden_dim) of every bag of a padded batch."""
        return torch.stack([self.encode(bag)[0] for bag in _bags(batch)])

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """D_S: logits (..., n_classes) of latents (..., hidden_dim)."""
        return self.classifier(latent)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Bag logits (B, n_classes): eq. 2, D_S(E_S(x_S))."""
        return self.decode(self.encode_batch(batch))

    def n_instances(self, n_patches: int) -> int:
        """k of a bag of ``n_patches``: ``min(k_sample, n_patches // 2)``.

        CLAM takes ``k_sample`` patches from each end and fails on a bag smaller than that;
        here a small bag gives k = n // 2, so the top-k and bottom-k sets never share a patch
        (no patch gets both pseudo-labels). A bag of one patch has k = 0 and no instance loss.
        """
        return min(self.k_sample, n_patches // 2)

    def instance_loss(
        self, instances: torch.Tensor, attention: torch.Tensor, label: int
    ) -> torch.Tensor | None:
        """CLAM's instance loss of one bag (``inst_eval`` and ``inst_eval_out``).

        The classifier of the true class learns pseudo-label 1 for the k patches of highest
        attention and 0 for the k of lowest; with ``subtyping`` every other class's classifier
        learns 0 for the top-k patches (in a subtyping problem the bag's most attended patches
        are evidence against the other subtypes). Each term is the mean cross-entropy over its
        patches; the loss is the mean over the classifiers used (all classes with subtyping,
        else the true class's only), as CLAM. ``None`` when the bag is too small (k = 0).
        """
        k = self.n_instances(attention.shape[0])
        if k == 0:
            return None
        top = attention.topk(k).indices
        bottom = (-attention).topk(k).indices
        terms = []
        for index, classifier in enumerate(self.instance_classifiers):
            if index == label:  # in the class: top-k positive, bottom-k negative
                chosen = torch.cat([instances[top], instances[bottom]])
                targets = torch.cat([attention.new_ones(k), attention.new_zeros(k)]).long()
            elif self.subtyping:  # out of the class: top-k negative
                chosen, targets = instances[top], attention.new_zeros(k).long()
            else:
                continue
            terms.append(F.cross_entropy(classifier(chosen), targets))
        return torch.stack(terms).mean()

    def loss(
        self, batch: Mapping[str, torch.Tensor], class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """CLAM's total loss ``bag_weight * bag + (1 - bag_weight) * instance``, the logits
        (B, n_classes) and both terms.

        ``bag`` is the cross-entropy of the bag logits, weighted by ``class_weight`` when
        given (the instance terms stay unweighted: their pseudo-labels are not the bag
        classes); ``instance`` is the mean of :meth:`instance_loss` over the bags that have
        one (zero when none has). CLAM steps one bag at a time; a batch of B bags takes the
        mean of both terms over its bags.
        """
        labels = batch["label"]
        latents, instance_terms = [], []
        for bag, label in zip(_bags(batch), labels.tolist(), strict=True):
            instances, attention, latent = self._embed(bag)
            latents.append(latent)
            term = self.instance_loss(instances, attention, label)
            if term is not None:
                instance_terms.append(term)
        logits = self.decode(torch.stack(latents))
        bag_loss = F.cross_entropy(logits, labels, weight=class_weight)
        if instance_terms:
            instance = torch.stack(instance_terms).mean()
        else:
            instance = bag_loss.new_zeros(())
        total = self.bag_weight * bag_loss + (1.0 - self.bag_weight) * instance
        return total, logits, {"bag": bag_loss, "instance": instance}


def _bags(batch: Mapping[str, torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each bag of a padded batch, cut to its real patches."""
    features, counts = batch["features"], batch["n_patches"]
    if features.ndim != 3 or counts.shape != features.shape[:1]:
        raise ValueError(
            f"features must be (B, N_max, in_dim) and n_patches (B,), got "
            f"{tuple(features.shape)} and {tuple(counts.shape)}"
        )
    for bag, count in zip(features, counts.tolist(), strict=True):
        if not 1 <= count <= features.shape[1]:
            raise ValueError(f"n_patches must be in [1, {features.shape[1]}], got {count}")
        yield bag[:count]


# --------------------------------------------------------------------------- C_I: 3D DenseNet

#: ``precision`` of :class:`DenseNetVolumeClassifier`: bf16 autocast on a GPU, always, never.
PRECISIONS = ("auto", "bf16", "fp32")


@contextmanager
def _batchnorm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Restore every batch-norm running statistic of ``module`` on exit.

    Activation checkpointing runs a block a second time in the backward pass; in training
    mode that second run would move the running mean and variance once more. Their output
    does not depend on them in training mode, so restoring them makes checkpointing exact.
    """
    buffers = [
        buffer
        for layer in module.modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm)
        for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked)
        if buffer is not None
    ]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


class DenseNetVolumeClassifier(nn.Module):
    """The RadPath inferior classifier C_I: MONAI's 3D DenseNet on a stack of MRI sequences.

    E_I is MONAI's ``features`` (stem, dense blocks, transitions, final norm), then ReLU and
    global average pooling: z_I has ``latent_dim`` channels (1024 for DenseNet-121, the
    defaults). D_I is MONAI's final linear layer. The paper uses the RadPath 2019 winners'
    DenseNet-121 on 155 × 240 × 240 volumes; ``checkpointing=True`` runs each dense block
    under activation checkpointing in training (its activations are recomputed in the backward
    pass instead of kept), with the same outputs, gradients and batch-norm statistics.
    ``precision`` ``auto`` runs E_I under bfloat16 autocast on a GPU (``bf16`` everywhere,
    ``fp32`` never); latents and logits are float32 either way. ``channels_last`` keeps the
    volumes channels-last-3d on a GPU (cuDNN's faster layout for 3D convolutions in bf16).

    Batches: ``volume`` (B, C, D, H, W) and ``label`` (B,). In evaluation mode batch norm uses
    its running statistics, so a volume gets the same logits (and z_I) alone or in any batch.
    A deliberate departure: the authors' latent extraction (``radpath/rad/
    latent_representations.ipynb``) sets ``track_running_stats=False`` after ``eval()``, so
    each volume, extracted one at a time, is normalised with its own statistics.
    """

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        *,
        init_features: int = 64,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        dropout: float = 0.0,
        checkpointing: bool = False,
        precision: str = "auto",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
        from monai.networks.nets import DenseNet  # heavy import, deferred to construction

        net = DenseNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=n_classes,
            init_features=init_features,
            growth_rate=growth_rate,
            block_config=tuple(block_config),
            dropout_prob=dropout,
        )
        self.features = net.features
        self.pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(1))
        self.classifier = net.class_layers.out  # D_I
        self.num_classes = n_classes
        self.checkpointing = checkpointing
        self.precision, self.channels_last = precision, channels_last

    def _autocast(self, device: torch.device):
        """bfloat16 autocast of E_I where ``precision`` asks for it on ``device``."""
        enabled = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

    @property
    def latent_dim(self) -> int:
        """Width of z_I."""
        return self.classifier.in_features

    def encode(self, volume: torch.Tensor) -> torch.Tensor:
        """E_I: z_I (B, latent_dim) float32 of volumes (B, C, D, H, W) (eq. 3)."""
        if self.channels_last and volume.device.type == "cuda":
            volume = volume.contiguous(memory_format=torch.channels_last_3d)
        with self._autocast(volume.device):
            return self._encode(volume).float()

    def _encode(self, volume: torch.Tensor) -> torch.Tensor:
        x = volume
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for name, layer in self.features.named_children():
            if recompute and name.startswith("denseblock"):
                x = activation_checkpoint(
                    layer,
                    x,
                    use_reentrant=False,
                    context_fn=lambda layer=layer: (
                        nullcontext(),
                        _batchnorm_statistics_kept(layer),
                    ),
                )
            else:
                x = layer(x)
        return self.pool(x)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """D_I: logits (..., n_classes) of latents (..., latent_dim)."""
        return self.classifier(latent)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, n_classes): eq. 2, D_I(E_I(x_I))."""
        return self.decode(self.encode(batch["volume"]))


# --------------------------------------------------------------------------- 2D CNN (Derm7pt)


class ImageClassifier2D(nn.Module):
    """A 2D CNN with one linear head per task: the Derm7pt classifiers C_I and C_S.

    E is a timm model without its classifier (``num_classes=0``: pooled features); Kawahara
    et al.'s clinical and dermoscopic models are Inception-v3s (``"inception_v3"``, 2048-d
    latents), trained jointly on the diagnosis and the seven 7-point criteria. D is one linear
    layer per task. No weights are downloaded: ``checkpoint`` names a local encoder file
    (:func:`mmdiag.models.encoders.create_encoder`).

    Batches: ``image`` (B, 3, H, W) and ``label`` (B,), the first task's label; the other
    tasks' labels are ``labels_<task>`` (the first task may also be given so).
    """

    def __init__(
        self,
        backbone: str,
        task_classes: Mapping[str, int],
        *,
        checkpoint: str | Path | None = None,
    ) -> None:
        super().__init__()
        if not task_classes:
            raise ValueError("task_classes must name at least one task")
        bad = {task: n for task, n in task_classes.items() if n < 2}
        if bad:
            raise ValueError(f"every task needs >= 2 classes, got {bad}")
        self.encoder = create_encoder(backbone, checkpoint=checkpoint)
        self.heads = nn.ModuleDict(
            {task: nn.Linear(self.encoder.num_features, n) for task, n in task_classes.items()}
        )
        self.tasks = tuple(task_classes)
        self.num_classes = task_classes[self.tasks[0]]

    @property
    def latent_dim(self) -> int:
        """Width of z."""
        return self.encoder.num_features

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """E: z (B, latent_dim) of images (B, 3, H, W) (eq. 3)."""
        return self.encoder(image)

    def decode(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """D: logits of every task, ``{task: (..., n_classes_task)}``."""
        return {task: head(latent) for task, head in self.heads.items()}

    def forward_tasks(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits of every task for a batch."""
        return self.decode(self.encode(batch["image"]))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, n_classes) of the first task."""
        return self.forward_tasks(batch)[self.tasks[0]]

    def task_labels(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each task's labels: ``labels_<task>``, or ``label`` for the first task."""
        labels = {}
        for index, task in enumerate(self.tasks):
            key = f"labels_{task}"
            if key not in batch and index > 0:
                raise KeyError(f"batch has no {key!r} for task {task!r}")
            labels[task] = batch[key] if key in batch else batch["label"]
        return labels

    def loss(
        self, batch: Mapping[str, torch.Tensor], class_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Sum over tasks of each task's mean cross-entropy (the tasks weigh equally, as in
        Kawahara et al.'s multi-task training), the first task's logits and each task's term.

        ``class_weight`` weights the first task's cross-entropy only: it is computed from
        ``label``, the first task's labels.
        """
        logits = self.forward_tasks(batch)
        terms = {}
        for task, labels in self.task_labels(batch).items():
            weight = class_weight if task == self.tasks[0] else None
            terms[task] = F.cross_entropy(logits[task], labels, weight=weight)
        total = torch.stack(list(terms.values())).sum()
        return total, logits[self.tasks[0]], terms


# --------------------------------------------------------------------------- G and F


class GuidanceModel(nn.Module):
    """G of eq. 4: an autoencoder-like MLP from z_I to an estimate of z_S.

    Linear layers ``in_dim -> hidden_dims... -> out_dim``, each hidden layer followed by ReLU
    and dropout; the narrowest hidden layer is the bottleneck (256 for RadPath, 512 for
    Derm7pt: :data:`RADPATH_GUIDANCE`, :data:`DERM7PT_GUIDANCE`). With ``output_relu`` the
    estimate passes a final ReLU, as in the authors' code: the targets are non-negative
    (CLAM's z_S is an attention-weighted mean of ReLU features, a CNN's pooled features follow
    a ReLU), so the estimate is kept in the same range.
    """

    #: State-dict key of the output layer's weight, (out_dim, last hidden width).
    OUTPUT_KEY = "output.weight"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dims: Sequence[int] = (512, 256, 256),
        dropout: float = 0.25,
        output_relu: bool = True,
    ) -> None:
        super().__init__()
        dims = (in_dim, *hidden_dims)
        layers: list[nn.Module] = []
        for width_in, width_out in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(width_in, width_out), nn.ReLU(), nn.Dropout(dropout)]
        self.hidden = nn.Sequential(*layers)
        self.output = nn.Linear(dims[-1], out_dim)
        self.output_activation = nn.ReLU() if output_relu else nn.Identity()
        self.in_dim, self.out_dim, self.hidden_dims = in_dim, out_dim, tuple(hidden_dims)

    def forward(self, z_inferior: torch.Tensor) -> torch.Tensor:
        """z_S_hat (..., out_dim) of z_I (..., in_dim): eq. 4, z_S_hat = G(z_I)."""
        return self.output_activation(self.output(self.hidden(z_inferior)))


def guidance_loss(z_hat: torch.Tensor, z_superior: torch.Tensor) -> torch.Tensor:
    """Eq. 4's training loss: the mean squared error between z_S_hat and z_S (same shape)."""
    if z_hat.shape != z_superior.shape:
        raise ValueError(
            f"z_hat and z_superior must have one shape, got {tuple(z_hat.shape)} and "
            f"{tuple(z_superior.shape)}"
        )
    return F.mse_loss(z_hat, z_superior)


class GuidanceFit(nn.Module):
    """Step 2 (Fig. 1(c)): G trained by eq. 4's MSE, between E_I and the frozen D_S.

    Batches: ``z_inferior`` (B, d_I), ``z_superior`` (B, d_S; training only) and ``label``.
    :meth:`loss` is :func:`guidance_loss` of G(z_I) against z_S; ``forward`` classifies the
    estimate with the superior decoder, D_S(G(z_I)), the paper's "G(I)" row (Tables 1-2),
    which needs z_I alone. D_S is frozen (:func:`mmdiag.training.stages.freeze`): only G
    learns, and the logits are only reported (the loop logs their accuracy).
    """

    #: State-dict prefix of G in this module's checkpoint.
    GUIDANCE_PREFIX = "guidance."

    def __init__(self, guidance: GuidanceModel, superior_decoder: nn.Module) -> None:
        super().__init__()
        self.guidance = guidance
        self.superior_decoder = freeze(superior_decoder)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits D_S(G(z_I)) (B, n_classes)."""
        return self.superior_decoder(self.guidance(batch["z_inferior"]))

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 4's MSE between G(z_I) and z_S, and the logits D_S(G(z_I))."""
        z_superior_hat = self.guidance(batch["z_inferior"])  # eq. 4
        logits = self.superior_decoder(z_superior_hat)
        return guidance_loss(z_superior_hat, batch["z_superior"]), logits


class LatentLinear(nn.Module):
    """One linear layer on a latent ``z`` (B, d): the paper's linear classifiers on stored
    latents, e.g. "S + I" (Table 1 row 1, [z_S ⌢ z_I]) or a head retrained on z_I alone.

    Takes a tensor or a batch with ``z`` (the training loop's form).
    """

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(in_dim, n_classes)
        self.num_classes = n_classes

    def forward(self, batch: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        z = batch if isinstance(batch, torch.Tensor) else batch["z"]
        return self.classifier(z)


class GuidedClassifier(nn.Module):
    """F of eq. 5: the combined decoder D_c on [G(z_I) ⌢ z_I], G frozen.

    D_c is one linear layer (supplementary Table 1, "Linear"; the authors' RadPath notebook
    has a two-layer MLP with ReLU and dropout after its logits instead). G is frozen with
    :func:`mmdiag.training.stages.freeze`: no gradients and evaluation mode for good, so its
    dropout stays off while D_c trains. The inputs are latents z_I from the frozen E_I; train
    with (class-)weighted cross-entropy, as the paper.
    """

    def __init__(self, guidance: GuidanceModel, inferior_dim: int, n_classes: int) -> None:
        super().__init__()
        if guidance.in_dim != inferior_dim:
            raise ValueError(
                f"inferior_dim {inferior_dim} does not match G's input width {guidance.in_dim}"
            )
        self.guidance = freeze(guidance)
        self.classifier = nn.Linear(guidance.out_dim + inferior_dim, n_classes)  # D_c
        self.num_classes = n_classes

    def forward(self, batch: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) of z_I (B, d), given as a tensor or as ``z_inferior`` of a
        batch (the training loop's form)."""
        z_inferior = batch if isinstance(batch, torch.Tensor) else batch["z_inferior"]
        z_superior_hat = self.guidance(z_inferior)  # eq. 4
        return self.classifier(torch.cat([z_superior_hat, z_inferior], dim=-1))  # eq. 5


# --------------------------------------------------------------------------- constructors


def _clam_example() -> tuple[dict, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 8, generator=generator)
    features[1, 4:] = 0.0  # the second bag has 4 real patches
    kwargs = {"in_dim": 8, "n_classes": 3, "hidden_dim": 16, "attention_dim": 8, "k_sample": 2}
    return kwargs, {
        "features": features,
        "n_patches": torch.tensor([6, 4]),
        "label": torch.tensor([0, 2]),
    }


def _densenet_example() -> tuple[dict, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    kwargs = {
        "in_channels": 1,
        "n_classes": 3,
        "init_features": 4,
        "growth_rate": 4,
        "block_config": (1, 1),
    }
    volume = torch.randn(2, 1, 16, 16, 16, generator=generator)
    return kwargs, {"volume": volume, "label": torch.tensor([0, 2])}


def _image_example() -> tuple[dict, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    kwargs = {"backbone": "test_convnext", "task_classes": {"diagnosis": 3, "pn": 2}}
    image = torch.randn(2, 3, 32, 32, generator=generator)
    return kwargs, {
        "image": image,
        "label": torch.tensor([0, 2]),
        "labels_pn": torch.tensor([1, 0]),
    }


def _guided_example() -> tuple[dict, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    kwargs = {"inferior_dim": 8, "superior_dim": 6, "n_classes": 3, "hidden_dims": (4,)}
    z_inferior = torch.randn(4, 8, generator=generator)
    return kwargs, {"z_inferior": z_inferior, "label": torch.tensor([0, 1, 2, 0])}


def _guidance_fit_example() -> tuple[dict, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    kwargs = {"inferior_dim": 8, "superior_dim": 6, "n_classes": 3, "hidden_dims": (4,)}
    return kwargs, {
        "z_inferior": torch.randn(4, 8, generator=generator),
        "z_superior": torch.rand(4, 6, generator=generator),
        "label": torch.tensor([0, 1, 2, 0]),
    }


def _latent_linear_example() -> tuple[dict, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4, 8, generator=generator)
    return {"in_dim": 8, "n_classes": 3}, {"z": z, "label": torch.tensor([0, 1, 2, 0])}


@register_model(family="guide", example=_clam_example)
def clam_sb(in_dim: int = 1024, n_classes: int = 3, **kwargs) -> ClamSB:
    """CLAM-SB, the superior (WSI) classifier; options ``hidden_dim``, ``attention_dim``,
    ``dropout``, ``k_sample``, ``bag_weight``, ``subtyping``."""
    return ClamSB(in_dim, n_classes, **kwargs)


@register_model(family="guide", example=_densenet_example)
def densenet_volume(in_channels: int = 4, n_classes: int = 3, **kwargs) -> DenseNetVolumeClassifier:
    """The 3D DenseNet (121 by default) inferior (MRI) classifier; options ``init_features``,
    ``growth_rate``, ``block_config``, ``dropout``, ``checkpointing``."""
    return DenseNetVolumeClassifier(in_channels, n_classes, **kwargs)


@register_model(family="guide", example=_image_example)
def image_classifier_2d(
    backbone: str = "inception_v3",
    task_classes: Mapping[str, int] | None = None,
    checkpoint: str | None = None,
) -> ImageClassifier2D:
    """A multi-task 2D CNN (Derm7pt: clinical or dermoscopic images); ``task_classes``
    defaults to a single 5-class ``diagnosis`` task."""
    return ImageClassifier2D(backbone, task_classes or {"diagnosis": 5}, checkpoint=checkpoint)


@register_model(family="guide", example=_guided_example)
def guided_classifier(
    inferior_dim: int = 1024,
    superior_dim: int = 512,
    n_classes: int = 3,
    *,
    hidden_dims: Sequence[int] = (512, 256, 256),
    dropout: float = 0.25,
    output_relu: bool = True,
    guidance_checkpoint: str | None = None,
    guidance_prefix: str = "",
) -> GuidedClassifier:
    """F of eq. 5 with G ``inferior_dim -> hidden_dims -> superior_dim`` (RadPath's sizes by
    default), loaded from the safetensors ``guidance_checkpoint`` of step 2 when given
    (tensors under ``guidance_prefix``; see :func:`mmdiag.training.stages.load_stage`)."""
    guidance = GuidanceModel(
        inferior_dim,
        superior_dim,
        hidden_dims=hidden_dims,
        dropout=dropout,
        output_relu=output_relu,
    )
    if guidance_checkpoint is not None:
        load_stage(guidance, guidance_checkpoint, prefix=guidance_prefix)
    return GuidedClassifier(guidance, inferior_dim, n_classes)


@register_model(family="guide", example=_guidance_fit_example)
def guidance_fit(
    inferior_dim: int = 1024,
    superior_dim: int = 512,
    n_classes: int = 3,
    *,
    hidden_dims: Sequence[int] = (512, 256, 256),
    dropout: float = 0.25,
    output_relu: bool = True,
) -> GuidanceFit:
    """Step 2: G (RadPath's sizes by default) fitted by eq. 4 before a D_S, here a fresh
    linear layer (the method loads the superior classifier's D_S instead)."""
    guidance = GuidanceModel(
        inferior_dim,
        superior_dim,
        hidden_dims=hidden_dims,
        dropout=dropout,
        output_relu=output_relu,
    )
    return GuidanceFit(guidance, nn.Linear(superior_dim, n_classes))


@register_model(family="guide", example=_latent_linear_example)
def latent_linear(in_dim: int = 1536, n_classes: int = 3) -> LatentLinear:
    """A linear classifier on stored latents ("S + I": z_S ⌢ z_I, 512 + 1024 for RadPath)."""
    return LatentLinear(in_dim, n_classes)
