"""CTMM: the contrast-boosted typing memory of MHD-Net (type-wise banks, ConMB, eq. 11 reading).

Paper: H. Zhang et al., "MHD-Net: Memory-aware hetero-modal distillation network for thymic
epithelial tumor typing with missing pathology modality", IEEE Journal of Biomedical and
Health Informatics, 2024 (Section III-B, eqs. 5-11). Authors' code:
https://github.com/wangpengyu0829/MHD-Net (commit dd00296, ``_Memory_Block`` in
``resnet_mem.py``; the ConMB loss is not in the public code).

One stage holds K type banks of M items of dimension D (:class:`TypeMemoryBank`);
:class:`TypeMemory` holds the stages and the ConMB loss. A stage feature map (B, c, t, h, w)
gives one query per spatial position: B * h * w queries of dimension D = c * t (c outer,
t inner), as in the authors' code. The paper's item dimension C = c_s cannot satisfy eq. 11's
reshape to t x c x h x w, so items have dimension c * t (768 at every stage at paper scale:
64 * 12, 128 * 6, 256 * 3), which also makes every stage's features comparable with every
stage's bank, as ConMB's inter-stage reconstructions require.

Order of use:

* Teacher training (``train()`` mode): :meth:`TypeMemory.update` (eqs. 5-6, no gradient) runs
  first, then :meth:`TypeMemory.conmb_loss` (eqs. 7-9) reads the *updated* banks, as the paper
  says ("the updated memory bank"); :meth:`TypeMemory.forward` does both in that order. The
  caller adds ``alpha_conmb * loss`` to the CE losses (eq. 10; ``PAPER_ALPHA_CONMB`` = 0.3).
* Student training and evaluation: :meth:`TypeMemory.read_maps` (eq. 11) takes only the
  teacher radiology branch's type probabilities, never labels, and never changes a buffer.

Eq. 11 weights the banks' items themselves, not query reconstructions: pathology is missing
in the student, so there is nothing to query with. Item i of a bank sits at position i of a
sqrt(M) x sqrt(M) grid (row-major), nearest-upsampled to the stage's h x w (Table V: the
784 stage-1 items form a 28 x 28 grid read back at 56 x 56).

Deliberate departures from the authors' public code: slots that receive no query keep their
value (the public code decays them towards zero); labels are used only to update, and only in
training (the public code also updates the memory with test labels); only tumour sequences
update the banks; banks are buffers, not parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

WHO_TYPES = ("A", "AB", "B1", "B1+B2", "B2", "B2+B3", "B3", "TC")  # K = 8 TET types
PAPER_ITEM_DIM = 768  # c_s * t_s: 64 * 12, 128 * 6, 256 * 3
PAPER_CAPACITIES = (784, 784, 196)  # Table V, best setting
TABLE_V_CAPACITIES = ((3136, 784, 196), (784, 784, 196), (784, 196, 196))
PAPER_DECAY = 0.999  # lambda of eq. 6 in the authors' code
PAPER_ALPHA_CONMB = 0.3  # eq. 10, Fig. 7


# --------------------------------------------------------------------------- feature-map helpers


def map_to_queries(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, c, t, h, w) -> (B, h * w, c * t): one query per spatial position (c outer, t inner)."""
    if feature_map.dim() != 5:
        raise ValueError(
            f"feature_map must be (B, c, t, h, w), got shape {tuple(feature_map.shape)}"
        )
    b, c, t, h, w = feature_map.shape
    return feature_map.permute(0, 3, 4, 1, 2).reshape(b, h * w, c * t)


def grid_side(num_items: int) -> int:
    """Side of the square grid the items of a bank form; ValueError if M is not a square."""
    side = math.isqrt(num_items)
    if side * side != num_items:
        raise ValueError(f"num_items must be a square to be laid out as a map, got {num_items}")
    return side


def items_to_map(items: torch.Tensor, channels: int, depth: int, height: int, width: int):
    """(B, M, c * t) items -> (B, c, t, h, w): item i at row-major cell i of a sqrt(M) grid,
    each cell nearest-upsampled to an (h / sqrt(M)) x (w / sqrt(M)) block (eq. 11's reshape)."""
    b, m, d = items.shape
    side = grid_side(m)
    if d != channels * depth:
        raise ValueError(f"item dimension {d} must equal channels * depth = {channels * depth}")
    if height % side or width % side:
        raise ValueError(f"height and width must be multiples of {side}, got {height}x{width}")
    grid = items.reshape(b, side, side, channels * depth).permute(0, 3, 1, 2)
    if (height, width) != (side, side):
        grid = F.interpolate(grid, size=(height, width), mode="nearest")
    return grid.reshape(b, channels, depth, height, width)


# --------------------------------------------------------------------------- one stage


class TypeMemoryBank(nn.Module):
    """One stage's type-wise memory: K banks of M items of dimension D, kept in a buffer.

    Parameters
    ----------
    num_types : int
        K, the number of tumour types (8 WHO types in the paper).
    num_items : int
        M, the items per type bank (Table V).
    item_dim : int
        D = c_s * t_s.
    decay : float
        lambda of eq. 6, the weight the old item keeps in the moving average.
    seed : int
        Seed of the standard-normal initialisation (the authors' ``torch.randn``); zeros would
        make every cosine similarity of eq. 5 zero and send all queries to slot 0.

    Notes
    -----
    The banks are a buffer ``items`` (K, M, D): saved in the state_dict, never given a
    gradient, changed only by :meth:`update` in training mode.
    """

    def __init__(self, num_types: int, num_items: int, item_dim: int, *, decay: float, seed: int):
        super().__init__()
        for name, value in (("num_types", num_types), ("num_items", num_items)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if item_dim < 1:
            raise ValueError(f"item_dim must be at least 1, got {item_dim}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "items", torch.randn(num_types, num_items, item_dim, generator=generator)
        )

    @property
    def num_types(self) -> int:
        return self.items.shape[0]

    @property
    def num_items(self) -> int:
        return self.items.shape[1]

    @property
    def item_dim(self) -> int:
        return self.items.shape[2]

    def extra_repr(self) -> str:
        return f"K={self.num_types}, M={self.num_items}, D={self.item_dim}, decay={self.decay}"

    @torch.no_grad()
    def update(self, queries: torch.Tensor, labels: torch.Tensor, tumour: torch.Tensor) -> None:
        """Moving-average update of the ground-truth type's bank by its queries (eqs. 5-6).

        ``queries`` (B, J, D), ``labels`` (B,) type indices, ``tumour`` (B,) bool: only tumour
        sequences update, and sample b only touches bank ``labels[b]``. Samples are applied
        one after another in batch order, each as one step of eq. 6 (the paper's eq. 6 is
        written for one feature map; the authors' code loops the same way). Several queries
        of one sample assigned to a slot are averaged (eq. 6's indicator-weighted mean); a
        slot that receives none keeps its value. Training mode only (labels are never used
        at evaluation).
        """
        if not self.training:
            raise RuntimeError(
                "the memory is updated only in training mode (labels are not used at evaluation)"
            )
        self._check_queries(queries)
        labels, tumour = self._checked_labels(labels, tumour, queries.shape[0])
        for b in torch.nonzero(tumour).flatten().tolist():
            self._update_one(queries[b].to(self.items.dtype), int(labels[b]))

    def _update_one(self, queries: torch.Tensor, label: int) -> None:
        """Eqs. 5-6 for one sample's (J, D) queries on bank ``label``."""
        bank = self.items[label]
        similarity = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T  # eq. 5: (J, M)
        slot = similarity.argmax(dim=1)  # r(j) = argmax_i S_ij
        counts = torch.bincount(slot, minlength=self.num_items)
        sums = torch.zeros_like(bank).index_add_(0, slot, queries)
        hit = counts > 0
        mean = sums[hit] / counts[hit].unsqueeze(1).to(bank.dtype)
        bank[hit] = self.decay * bank[hit] + (1.0 - self.decay) * mean  # eq. 6

    def reconstruct(self, queries: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        """Soft-attention reconstruction of ``queries`` (..., D) from all K * M items (eqs. 7-8).

        The attention is a softmax over every item of every type of the cosine similarity
        divided by ``temperature`` (eq. 7 has temperature 1); the result is the attention-
        weighted sum of items (eq. 8). Gradients reach the queries, never the banks.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if queries.shape[-1] != self.item_dim:
            raise ValueError(
                f"queries must end in item_dim={self.item_dim}, got {tuple(queries.shape)}"
            )
        items = self.items.reshape(-1, self.item_dim).to(queries.dtype)
        similarity = F.normalize(queries, dim=-1) @ F.normalize(items, dim=-1).T  # eq. 5 / S-hat
        attention = torch.softmax(similarity / temperature, dim=-1)  # eq. 7: over K * M items
        return attention @ items  # eq. 8

    def type_weighted_items(self, type_weights: torch.Tensor) -> torch.Tensor:
        """sum_k z(k) * chi(k): (B, K) type probabilities -> (B, M, D) items (eq. 11).

        Reads only: no labels, no buffer change. Works in either mode.
        """
        if type_weights.dim() != 2 or type_weights.shape[1] != self.num_types:
            raise ValueError(
                f"type_weights must be (B, {self.num_types}), got {tuple(type_weights.shape)}"
            )
        return torch.einsum("bk,kmd->bmd", type_weights, self.items.to(type_weights.dtype))

    def _check_queries(self, queries: torch.Tensor) -> None:
        if queries.dim() != 3 or queries.shape[2] != self.item_dim:
            raise ValueError(f"queries must be (B, J, {self.item_dim}), got {tuple(queries.shape)}")

    def _checked_labels(self, labels: torch.Tensor, tumour: torch.Tensor, batch: int):
        labels = torch.as_tensor(labels, device=self.items.device).long()
        tumour = torch.as_tensor(tumour, device=self.items.device).bool()
        if labels.shape != (batch,) or tumour.shape != (batch,):
            raise ValueError(
                f"labels and tumour must have shape ({batch},), got {tuple(labels.shape)} "
                f"and {tuple(tumour.shape)}"
            )
        typed = labels[tumour]  # other (non-tumour) sequences may carry the extra class K
        if typed.numel() and (typed.min() < 0 or typed.max() >= self.num_types):
            raise ValueError(
                f"tumour labels must lie in [0, {self.num_types}), got {typed.tolist()}"
            )
        return labels, tumour


# --------------------------------------------------------------------------- all stages


class TypeMemory(nn.Module):
    """CTMM over all stages: type-wise updating, ConMB boosting and prediction-aware reading.

    Parameters
    ----------
    item_dim : int
        D = c_s * t_s, shared by every stage (ConMB queries each stage's bank with every
        stage's features).
    capacities : sequence of int
        M per stage; at least two stages (eq. 9 needs an other-stage denominator).
    num_types : int
        K (8 WHO types).
    decay : float
        lambda of eq. 6.
    temperature : float
        Softmax temperature of eq. 7 (1 in the paper).
    seed : int
        Initialisation seed; stage s uses ``seed + s``.

    Examples
    --------
    >>> memory = TypeMemory(6, (4, 1), num_types=2)
    >>> maps = [torch.randn(3, 2, 3, 4, 4), torch.randn(3, 3, 2, 2, 2)]
    >>> loss = memory(maps, labels=torch.tensor([0, 1, 1]), tumour=torch.tensor([1, 1, 0]))
    >>> _ = memory.eval()
    >>> [m.shape for m in memory.read_maps(torch.full((3, 2), 0.5), [(2, 3, 4, 4), (3, 2, 2, 2)])]
    [torch.Size([3, 2, 3, 4, 4]), torch.Size([3, 3, 2, 2, 2])]
    """

    def __init__(
        self,
        item_dim: int = PAPER_ITEM_DIM,
        capacities: Sequence[int] = PAPER_CAPACITIES,
        *,
        num_types: int = len(WHO_TYPES),
        decay: float = PAPER_DECAY,
        temperature: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        if len(capacities) < 2:
            raise ValueError(f"capacities must name at least two stages, got {capacities}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.stages = nn.ModuleList(
            TypeMemoryBank(num_types, m, item_dim, decay=decay, seed=seed + s)
            for s, m in enumerate(capacities)
        )

    @property
    def num_types(self) -> int:
        """K, the number of type banks per stage."""
        return self.stages[0].num_types

    def forward(self, feature_maps, labels: torch.Tensor, tumour: torch.Tensor) -> torch.Tensor:
        """Teacher training step: update every stage (eq. 6), then ConMB on the updated banks.

        ``feature_maps`` are the pathology branch's stage maps (B, c_s, t_s, h_s, w_s); the
        update sees them detached, the returned loss (eq. 9) back-propagates into them.
        Only tumour sequences update the banks; ConMB averages over every sample, since the
        pathology features it reconstructs are tumour tissue whatever the CT sequence shows
        (call :meth:`update` and :meth:`conmb_loss` with ``sample_mask`` to restrict it).
        """
        self.update(feature_maps, labels, tumour)
        return self.conmb_loss(feature_maps)

    @torch.no_grad()
    def update(self, feature_maps, labels: torch.Tensor, tumour: torch.Tensor) -> None:
        """Eqs. 5-6 for every stage; see :meth:`TypeMemoryBank.update`. Training mode only."""
        for bank, queries in zip(self.stages, self._queries(feature_maps), strict=True):
            bank.update(queries.detach(), labels, tumour)

    def conmb_loss(self, feature_maps, *, sample_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Contrastive memory boosting loss (eq. 9), the mean over (masked) samples.

        For sample b and stage s, with f = f_P^s (all J_s queries) and f_rec^{ss'} its
        reconstruction from stage s' (eqs. 7-8)::

            L_b = sum_s eta_s ||f_rec^{ss} - f|| / sum_{s' != s} ||f_rec^{ss'} - f||
            eta = softmax_s(1 - cos(f_rec^{ss}, f))

        ||.|| is the Frobenius norm written in eq. 9 (the prose calls it an MSE; the squared
        norm would change the ratio), cos is taken over the whole flattened stage feature,
        and eta is a detached weight (the paper gives no gradient through it).
        ``sample_mask`` (B,) bool restricts the mean; an empty selection gives a zero that
        keeps the graph.
        """
        ratios, cosines = [], []
        for s, query in enumerate(self._queries(feature_maps)):
            recs = [bank.reconstruct(query, temperature=self.temperature) for bank in self.stages]
            distances = [torch.linalg.vector_norm((r - query).flatten(1), dim=1) for r in recs]
            ratios.append(distances[s] / (sum(distances) - distances[s]))  # one term of eq. 9
            cosines.append(F.cosine_similarity(recs[s].flatten(1), query.flatten(1), dim=1))
        eta = torch.softmax(1.0 - torch.stack(cosines, dim=1), dim=1).detach()  # eta_s
        per_sample = (eta * torch.stack(ratios, dim=1)).sum(dim=1)  # eq. 9
        if sample_mask is not None:
            per_sample = per_sample[torch.as_tensor(sample_mask, device=per_sample.device).bool()]
        return per_sample.sum() / max(per_sample.numel(), 1)

    def read_maps(self, type_weights: torch.Tensor, shapes: Sequence[Sequence[int]]):
        """Memory-aware pathology maps f_mem^s (eq. 11) from the radiology type probabilities.

        ``type_weights`` (B, K) is the softmax of the teacher radiology branch (caller's
        ``softmax(logits)``, detached as it likes); ``shapes`` gives (c_s, t_s, h_s, w_s) per
        stage. Returns one (B, c_s, t_s, h_s, w_s) map per stage. Takes no labels and changes
        no buffer, in either mode.
        """
        if len(shapes) != len(self.stages):
            raise ValueError(f"shapes must name {len(self.stages)} stages, got {len(shapes)}")
        return [
            items_to_map(bank.type_weighted_items(type_weights), *shape)
            for bank, shape in zip(self.stages, shapes, strict=True)
        ]

    def _queries(self, feature_maps) -> list[torch.Tensor]:
        if len(feature_maps) != len(self.stages):
            raise ValueError(
                f"feature_maps must hold {len(self.stages)} stages, got {len(feature_maps)}"
            )
        return [map_to_queries(feature_map) for feature_map in feature_maps]
