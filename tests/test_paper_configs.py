"""The paper configs (config/paper/*.yaml) hold the settings each paper states.

Each paper config is merged over the demo files, as Snakemake's ``--configfile`` does. The
comments name the paper's section or table that states each value.
"""

import copy
import logging
import math
from itertools import combinations
from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

from mmdiag.config import load_config, validate_config
from mmdiag.methods.cmus.settings import train_settings_of
from mmdiag.models import cmus as cmus_models
from mmdiag.models.cmus import CMUSConcat, CMUSNet
from mmdiag.training.loop import TrainSettings, train_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = [
    ROOT / "config/config.yaml",
    ROOT / "config/methods/cmus.yaml",
    ROOT / "config/methods/csmil.yaml",
    ROOT / "config/methods/guide.yaml",
    ROOT / "config/methods/ksfusion.yaml",
    ROOT / "config/methods/mhd.yaml",
]
PAPER = ROOT / "config/paper"
CSMIL_METHODS = ("csmil", "csmil_tcga", "csmil_micro", "csmil_macro")
CMUS_METHODS = ("cmus", "cmus_staging")
SWIN_B = "swin_base_patch4_window7_224"


@pytest.fixture(scope="module")
def csmil_paper():
    return load_config([*DEMO, PAPER / "csmil.yaml"])


@pytest.fixture(scope="module")
def cmus_paper():
    return load_config([*DEMO, PAPER / "cmus.yaml"])


@pytest.mark.parametrize("path", sorted(PAPER.glob("*.yaml")), ids=lambda p: p.name)
def test_every_paper_config_validates_over_the_demo(path):
    assert load_config([*DEMO, path])["methods"]


# --------------------------------------------------------------------------- CS-MIL


def test_csmil_paper_feeds_raw_features(csmil_paper):
    # Sec. 3.1 / 4.2: the MIL heads take the SimSiam embeddings as they are (no z-scoring);
    # the demo's standardisation must not leak into the paper runs.
    for method in CSMIL_METHODS:
        assert csmil_paper["methods"][method]["standardise_features"] is False, method


def test_csmil_paper_bags_and_training(csmil_paper):
    methods = csmil_paper["methods"]
    # Sec. 4.2 (CD): "100 image bags were randomly generated, each with a size of 8"
    assert (methods["csmil"]["bags"]["size"], methods["csmil"]["bags"]["test_bags"]) == (8, 100)
    # Sec. 4.2 (TCGA-GBMLGG): "500 image bags of size 32 were randomly generated for each WSI"
    tcga = methods["csmil_tcga"]["bags"]
    assert (tcga["size"], tcga["test_bags"]) == (32, 500)
    # Sec. 5.3 (toy datasets): "image bags with a size of 8"
    assert methods["csmil_micro"]["bags"]["size"] == methods["csmil_macro"]["bags"]["size"] == 8
    for method in CSMIL_METHODS:
        train = methods[method]["train"]
        # Sec. 4.2: "trained in 100 epochs in total"; hyper-parameters "consistent with those
        # of DeepAttnMISL": Adam, lr 5e-4, weight decay 1e-4 (the authors' code)
        assert train["epochs"] == 100, method
        assert (train["lr"], train["weight_decay"]) == (5e-4, 1e-4), method


def test_csmil_paper_features_and_splits(csmil_paper):
    # Sec. 4.2: k-means "with a class number of 8"
    assert csmil_paper["features"]["n_clusters"] == 8
    # Sec. 4.2: SimSiam, ResNet-50 backbone, 200 epochs, batch size 128, 2048-channel embeddings
    ssl = csmil_paper["ssl"]
    assert (ssl["backbone"], ssl["epochs"], ssl["batch_size"], ssl["dim"]) == (
        "resnet50",
        200,
        128,
        2048,
    )
    # Sec. 4.2: 256 x 256 patches at 20x (0.5 microns per pixel), 10x and 5x
    patching = csmil_paper["patching"]
    assert (patching["patch_px"], patching["base_mpp"], patching["context_factors"]) == (
        256,
        0.5,
        [2, 4],
    )
    # Sec. 4.2: CD in 10 data splits; TCGA-GBMLGG split 6:1:3 at the patient level
    schemes = csmil_paper["splits"]["schemes"]
    assert schemes[csmil_paper["methods"]["csmil"]["split"]]["n_repeats"] == 10
    tcga = schemes[csmil_paper["methods"]["csmil_tcga"]["split"]]
    assert tcga["fractions"] == [0.6, 0.1, 0.3]


# --------------------------------------------------------------------------- CMUS-Net


def test_cmus_paper_settings(cmus_paper):
    for method in CMUS_METHODS:
        settings = cmus_paper["methods"][method]
        train = settings["train"]
        # Sec. 4.2: 60 epochs, batch size 4, Adam with lr = weight decay = 5e-5
        assert (train["epochs"], train["batch_size"]) == (60, 4), method
        assert train["lr"] == train["weight_decay"] == 5e-5, method
        assert train["amsgrad"] is False, method  # the paper says Adam
        # Sec. 4.2: cosine annealing (the loop anneals from lr to lr_min)
        assert 0 <= train["lr_min"] < train["lr"], method
        # Sec. 4.2: resized to 224 x 224; Sec. 4.1: TEM 2048 x 2048 -> 2048 x 1940 (108 rows)
        assert settings["preprocess"]["image_size_px"] == 224, method
        assert settings["preprocess"]["tem_legend_px"] == 108, method
        # Sec. 4.2: five-fold cross-validation, train:test 4:1 (no validation part)
        scheme = cmus_paper["splits"]["schemes"][settings["split"]]
        assert (scheme["n_folds"], scheme["val_fraction"]) == (5, 0.0), method
        reference = settings["variants"][settings["reference"]]
        # Eq. 15 and Sec. 5.1.6: alpha (OM) 0.3, beta (IM) 0.5, gamma (TEM) 0.2
        assert reference["loss_weights"] == {"OM": 0.3, "IM": 0.5, "TEM": 0.2}, method
        for name, spec in settings["variants"].items():
            # Sec. 4.2: "Each encoder of our model uses the SwinT-B"
            if spec["model"] == "cmus_net":
                assert spec["encoder"] == SWIN_B, (method, name)


def test_cmus_fig3_rows_differ_only_in_the_attention(cmus_paper):
    # Sec. 5.1.2: the Fig. 3 models "are based on our model but replace the SMIL and CMSA
    # modules" by another attention (or none); the weighted loss of CMUS-Net stays.
    cmus = cmus_paper["methods"]["cmus"]
    rows = cmus["tables"]["fig3"]["rows"]
    reference = cmus["tables"]["fig3"]["reference"] or cmus["reference"]
    variants = {row: cmus["variants"][row] for row in rows}
    alternatives = [row for row in rows if row != reference]
    assert len(alternatives) == 4
    attentions = {variants[row]["fusion_attention"] for row in alternatives}
    assert attentions == {"none", "self", "modality", "bidirectional"}
    for row in alternatives:
        spec = variants[row]
        assert spec["weighted_loss"] and not spec["smil"], row
        for other in alternatives:
            differing = {
                k
                for k in spec.keys() | variants[other].keys()
                if spec.get(k) != variants[other].get(k)
            }
            assert differing <= {"fusion_attention"}, (row, other, differing)
    # CMUS-Net itself: SMIL + CMSA in place of the replaced modules, all else the same
    full = variants[reference]
    assert full["smil"] and full["fusion_attention"] == "cmsa"
    without = next(row for row in alternatives if variants[row]["fusion_attention"] == "none")
    differing = {k for k in full if full[k] != variants[without].get(k)}
    assert differing == {"smil", "fusion_attention"}
    assert cmus["tables"]["fig3"]["labels"][without] == "Without attention"


def test_cmus_table7_reference_is_im_tem(cmus_paper):
    staging = cmus_paper["methods"]["cmus_staging"]
    # Table 7 (MN staging, modality combinations): the Ref. row is IM + TEM (Sec. 6: "our
    # method performs better with just the IM and TEM modalities")
    table7 = staging["tables"]["table7"]
    reference = table7["reference"]
    assert reference in table7["rows"]
    assert staging["variants"][reference]["modalities"] == ["IM", "TEM"]
    every_subset = {c for r in (1, 2, 3) for c in combinations(("OM", "IM", "TEM"), r)}
    assert {tuple(staging["variants"][v]["modalities"]) for v in table7["rows"]} == every_subset
    # Table 6: the Ref. row is CMUS-Net with all three modalities
    table6_reference = staging["tables"]["table6"]["reference"] or staging["reference"]
    assert staging["variants"][table6_reference]["modalities"] == ["OM", "IM", "TEM"]


def test_cmus_paper_variants_name_their_imagenet_checkpoint(cmus_paper):
    # Sec. 4.2: the encoders start from ImageNet-1K weights; nothing is downloaded, so every
    # trained variant states `checkpoint:` (null until pointed at a local file)
    raw = yaml.safe_load((PAPER / "cmus.yaml").read_text())
    for method in CMUS_METHODS:
        for name, spec in raw["methods"][method]["variants"].items():
            if spec["model"] == "late_vote":
                continue
            assert "checkpoint" in spec and spec["checkpoint"] is None, (method, name)
            assert cmus_paper["methods"][method]["variants"][name]["checkpoint"] is None


# --------------------------------------------------------------------------- the warning


@pytest.fixture
def fresh_warning(monkeypatch, caplog):
    """The random-initialisation warning not yet given in this process; its records."""
    monkeypatch.setattr(cmus_models, "_warned_random_init", False)
    caplog.set_level(logging.WARNING, logger=cmus_models.__name__)
    return caplog


def _random_init_records(caplog):
    return [r for r in caplog.records if r.name == cmus_models.__name__]


def test_non_test_encoder_without_checkpoint_warns_once(fresh_warning):
    CMUSNet(encoder="resnet18", modalities=["OM"], hidden_dim=8)
    CMUSConcat(encoder="resnet18", modalities=["IM"], hidden_dim=8)
    records = _random_init_records(fresh_warning)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "resnet18" in message and "random" in message
    assert "ImageNet" in message and "checkpoint:" in message


def test_test_encoder_or_checkpoint_gives_no_warning(fresh_warning, tmp_path):
    CMUSNet(encoder="test_resnet", hidden_dim=8)
    CMUSConcat(encoder="test_resnet", modalities=["TEM"], hidden_dim=8)
    weights = tmp_path / "resnet18.pt"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), weights)
    CMUSConcat(encoder="resnet18", modalities=["OM"], hidden_dim=8, checkpoint=str(weights))
    assert _random_init_records(fresh_warning) == []


# --------------------------------------------------------------------------- amsgrad


class _Sample:
    def __init__(self, x: torch.Tensor, label: int) -> None:
        self.x, self.label = x, label


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, batch):
        return self.layer(batch["x"])


def _collate(samples, generators):
    return {
        "x": torch.stack([s.x for s in samples]),
        "label": torch.tensor([s.label for s in samples]),
    }


@pytest.mark.parametrize("amsgrad", [False, True])
def test_amsgrad_reaches_the_optimiser(monkeypatch, amsgrad):
    created = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    generator = torch.Generator().manual_seed(0)
    samples = [_Sample(torch.randn(4, generator=generator), i % 3) for i in range(6)]
    settings = TrainSettings(
        epochs=2,
        batch_size=3,
        lr=1e-2,
        lr_min=1e-3,
        weight_decay=0.0,
        device="cpu",
        amsgrad=amsgrad,
    )
    torch.manual_seed(0)
    history = train_model(_Linear(), samples, _collate, settings)
    assert len(created) == 1 and created[0].param_groups[0]["amsgrad"] is amsgrad
    # cosine annealing over the epochs (CMUS-Net Sec. 4.2): halfway after one of two epochs
    assert history[0]["lr"] == pytest.approx(1e-2)
    assert history[1]["lr"] == pytest.approx(1e-3 + (1e-2 - 1e-3) * (1 + math.cos(math.pi / 2)) / 2)


def test_amsgrad_goes_from_the_config_to_the_train_settings(cmus_paper):
    cmus = cmus_paper["methods"]["cmus"]
    assert train_settings_of(cmus, "cmus_net").amsgrad is False
    edited = copy.deepcopy(cmus_paper)
    edited["methods"]["cmus"]["train"]["amsgrad"] = True
    assert train_settings_of(validate_config(edited)["methods"]["cmus"], "cmus_net").amsgrad


# --------------------------------------------------------------------------- MHD-Net


@pytest.fixture(scope="module")
def mhd_paper():
    return load_config([*DEMO, PAPER / "mhd.yaml"])["methods"]["mhd"]


def test_mhd_paper_states_the_sequences_network_and_training(mhd_paper):
    from mmdiag.models.mhd import memory_item_dim

    assert mhd_paper["sequences"] | {} == {
        "depth": 24,
        "size": 224,
        "head_fraction": 0.2,
        "tail_fraction": 0.3,
        "min_lesion_fraction": 0.0,
        "hu_level": 50,
        "hu_width": 500,
        "patch_scale": None,
        "keep_other": True,
        "wsi_standardise": True,
        "wsi_fit_sequences": 2,
    }
    network = mhd_paper["network"]
    assert network["widths"] == [64, 128, 256, 512] and network["kernel_sizes"] == [7, 7, 7]
    assert (network["gate_kernel"], network["reduction"]) == (7, 4)
    assert network["capacities"] == [784, 784, 196]
    assert memory_item_dim(24, network["widths"]) == 768  # c_s * t_s at every stage
    train = mhd_paper["train"]
    assert (train["epochs"], train["batch_size"], train["lr"]) == (100, 8, 1e-3)


def test_mhd_paper_rows_change_only_what_their_row_names(mhd_paper):
    from mmdiag.methods.mhd.settings import model_arguments

    def arguments(variant):
        return model_arguments(mhd_paper, variant, 8)

    reference = arguments("mhd_net")
    assert reference["n_classes"] == 9  # 8 types + "other"
    expected = {
        "mhd_net_k3": {"kernel_sizes": [3, 3, 3]},
        "mhd_net_k9": {"kernel_sizes": [9, 9, 9]},
        "mhd_net_code_kappa": {"kernel_sizes": [7, 5, 3]},
        "mhd_net_m3136": {"capacities": [3136, 784, 196]},
        "mhd_net_m196": {"capacities": [784, 196, 196]},
        "no_conmb": {"alpha_conmb": 0.0},
        "no_ctmm": {"memory": False},
        "no_kl": {"alpha_kl": 0.0},
        "no_mse": {"alpha_mse": 0.0},
        "kl_t20": {"temperature": 20.0},
    }
    for variant, change in expected.items():
        differs = {k: v for k, v in arguments(variant).items() if reference.get(k) != v}
        assert differs == change, variant
    # every table row and figure variant is configured
    names = set(mhd_paper["variants"])
    assert all(set(t["rows"]) <= names for t in mhd_paper["tables"].values())


def test_mhd_paper_comparison_rows_are_built_as_the_tables_name_them(mhd_paper):
    from mmdiag.methods.mhd.settings import model_arguments
    from mmdiag.models.mhd_baselines import stage4_size

    tables = mhd_paper["tables"]
    assert tables["table3"]["rows"] == ["ct_resnet18", "moddrop", "mmformer", "sckd", "mhd_net"]
    assert tables["table4"]["rows"] == ["ct_resnet18", "pcct", "mhd_net", "teacher"]
    kinds = {v: mhd_paper["variants"][v]["model"] for v in ("mmformer", "moddrop", "sckd", "pcct")}
    assert kinds == {v: v for v in kinds}
    # SCKD distils the same teacher as MHD-Net's student, whose whole network it is built on
    assert mhd_paper["variants"]["sckd"]["teacher"] == mhd_paper["variants"]["mhd_net"]["teacher"]
    teacher = model_arguments(mhd_paper, "teacher", 8)
    sckd = model_arguments(mhd_paper, "sckd", 8)
    assert {k: sckd[k] for k in teacher} == teacher
    # mmFormer's tokens: the 2 x 7 x 7 stage-4 map of a 24 x 224² sequence per modality
    mmformer = model_arguments(mhd_paper, "mmformer", 8)
    assert (mmformer["frames"], mmformer["size"], mmformer["widths"]) == (
        24,
        224,
        [64, 128, 256, 512],
    )
    assert stage4_size(24, 224) == (2, 7) and mmformer["num_heads"] == 8
    assert model_arguments(mhd_paper, "pcct", 8)["widths"] == [64, 128, 256, 512]


# --------------------------------------------------------------------------- CMUS-Net Tables 5-6

# The paper's rows (Tables 5 and 6, top to bottom) and those the pipeline does not build.
CMUS_TABLE5_PAPER_ROWS = [
    "VGG16", "ResNet-50", "DenseNet-121", "ViT-B",  # unimodal
    "FPN", "InceptionV3", "Res2Net-50", "SwinT-B", "CrossViT", "CrossFormer++", "HiFuse",
    "CMUS-Net (ours)",
]  # fmt: skip
CMUS_TABLE6_PAPER_ROWS = [
    *CMUS_TABLE5_PAPER_ROWS[:-1],
    "MMGL", "mmFormer", "MDL-IIA",  # multi-modal
    "MSAN", "AGGN",  # multi-modal multi-scale
    "CMUS-Net (ours)",
]  # fmt: skip
CMUS_TABLE4_PAPER_ROWS = CMUS_TABLE6_PAPER_ROWS[-6:]  # MMGL ... AGGN, CMUS-Net
CMUS_ROWS_NOT_BUILT: set[str] = set()  # every row of Tables 4-6 is built


@pytest.mark.parametrize(
    ("method", "table", "paper_rows"),
    [
        ("cmus", "table4", CMUS_TABLE4_PAPER_ROWS),
        ("cmus", "table5", CMUS_TABLE5_PAPER_ROWS),
        ("cmus_staging", "table6", CMUS_TABLE6_PAPER_ROWS),
    ],
)
def test_cmus_tables_4_to_6_hold_every_built_row_in_the_papers_order(
    cmus_paper, method, table, paper_rows
):
    spec = cmus_paper["methods"][method]["tables"][table]
    built = [spec["labels"][row] for row in spec["rows"]]
    assert built == [row for row in paper_rows if row not in CMUS_ROWS_NOT_BUILT]


def test_cmus_table6_unimodal_rows_are_built_as_in_table5(cmus_paper):
    from mmdiag.models.crossformer import CROSSFORMER_SIZES
    from mmdiag.models.hifuse import HIFUSE_SIZES

    # Table 6 compares the same models on the MN staging dataset (Sec. 5.3)
    disease = cmus_paper["methods"]["cmus"]["variants"]
    staging = cmus_paper["methods"]["cmus_staging"]
    rows = staging["tables"]["table6"]["rows"]
    for row in rows:
        assert staging["variants"][row] == disease[row], row
    concat = [row for row in rows if disease[row]["model"] == "cmus_concat"]
    assert len(concat) == 11
    built_here = HIFUSE_SIZES.keys() | CROSSFORMER_SIZES.keys()
    for row in concat:  # every encoder is a timm model, an FPN over one, HiFuse or CrossFormer++
        encoder = disease[row]["encoder"]
        assert timm.is_model(encoder.removeprefix("fpn_")) or encoder in built_here, row
    # Sec. 5.2.1: FPN with its detection head replaced by two FC layers; ResNet-50 backbone
    assert disease["fpn"]["encoder"] == "fpn_resnet50"
    assert disease["hifuse"]["encoder"] == "hifuse_tiny"  # the authors' default size
    assert disease["crossformerpp"]["encoder"] == "crossformerpp_small"  # the smallest published


# --------------------------------------------------------------------------- CS-MIL DTFD, HAG

# Table 1 rows in the paper's order; HIPT (pretrained ViT-256 weights) is not built
CSMIL_TABLE1_BUILT_ROWS = [
    "deepattnmisl_20x", "deepattnmisl_10x", "deepattnmisl_5x", "gated_attention",
    "deepattnmisl_multi", "ms_da_mil", "ds_mil", "dtfd_mil", "hag_mil", "csmil",
]  # fmt: skip


def test_csmil_dtfd_and_hag_mil_rows_are_in_tables_1_and_5(csmil_paper):
    methods = csmil_paper["methods"]
    assert methods["csmil"]["tables"]["table1"]["rows"] == CSMIL_TABLE1_BUILT_ROWS
    for method in ("csmil_micro", "csmil_macro"):
        rows = methods[method]["tables"]["table5"]["rows"]
        assert rows.index("dtfd_mil") == rows.index("ds_mil") + 1, method
        assert rows.index("hag_mil") == rows.index("dtfd_mil") + 1, method
        labels = methods[method]["tables"]["table5"]["labels"]
        assert (labels["dtfd_mil"], labels["hag_mil"]) == ("DTFD-MIL", "HAG-MIL"), method
    # Table 1, TCGA-GBMLGG column
    assert {"dtfd_mil", "hag_mil"} <= set(methods["csmil_tcga"]["variants"])


def test_csmil_dtfd_mil_runs_as_the_paper_lists_it(csmil_paper):
    from mmdiag.models import create_model

    for method in CSMIL_METHODS:
        spec = csmil_paper["methods"][method]["variants"]["dtfd_mil"]
        # Table 1: patch scale "Multiple", clustering 20x (the default cluster column)
        assert spec["model"] == "dtfd_mil" and spec["clustering"], method
        assert spec["cluster_scale"] is None, method
        # the authors' code: AFS distillation, 4 pseudo-bags; every (location, scale) an instance
        model = create_model("dtfd_mil", in_dim=8, **spec["options"])
        assert (model.distillation, model.n_pseudo_bags) == ("AFS", 4), method
        assert model.scale_input == "instances", method
        # Sec. 5.1: every row trains with the same hyper-parameters
        assert csmil_paper["methods"][method]["train"]["lr"] == 5e-4, method


def test_csmil_hag_mil_reads_5x_then_10x_then_20x(csmil_paper):
    from mmdiag.models import create_model

    for method in CSMIL_METHODS:
        spec = csmil_paper["methods"][method]["variants"]["hag_mil"]
        assert spec["model"] == "hag_mil" and spec["cluster_scale"] is None, method
        model = create_model("hag_mil", in_dim=8, **spec["options"])
        # the authors' code: k_sample 8, IAM widths 1024-1536-512-1024; half kept per level
        assert (model.k_sample, model.keep_fraction) == (8, 0.5), method
        widths = [block.embed[0].out_features for block in model.levels[0].blocks]
        assert widths == [1024, 1536, 512, 1024], method


# --------------------------------------------------------------------------- DeepGuide

#: Table 1 of the DeepGuide paper: its rows for each MR column (P + R and P only under ALL).
GUIDE_TABLE1 = {
    "t1": ["R", "G(R)", "G(R) + R"],
    "t2": ["R", "G(R)", "G(R) + R"],
    "t1ce": ["R", "G(R)", "G(R) + R"],
    "flair": ["R", "G(R)", "G(R) + R"],
    "all": ["P + R", "P", "R", "G(R)", "G(R) + R"],
}


@pytest.fixture(scope="module")
def guide_paper():
    return load_config([*DEMO, PAPER / "guide.yaml"])


def test_guide_paper_tables_hold_every_row_of_table1_and_the_control(guide_paper):
    guide = guide_paper["methods"]["guide"]
    for column, rows in GUIDE_TABLE1.items():
        table = guide["tables"][f"table1_{column}"]
        labels = [table["labels"][row] for row in table["rows"]]
        assert labels == [*rows, "R + retrained head (control)"], column
        assert table["reference"] == f"r_{column}"
        assert guide["variants"][f"r_{column}"]["sequence"] == column


def test_guide_paper_recipes_are_the_supplements_table1(guide_paper):
    from mmdiag.methods.guide.settings import train_settings_of

    guide = guide_paper["methods"]["guide"]
    expected = {  # supplement Table 1: (batch, epochs, patience, optimiser, lr, WRS)
        "p": (1, 200, 20, "adam", 1e-4, "balanced"),
        "r_all": (10, 600, 50, "adam", 2e-4, "balanced"),
        "g_all": (50, 150, None, "sgd", 0.5, "shuffle"),
        "gr_all": (50, 500, 200, "sgd", 1e-3, "balanced"),
        "pr_all": (50, 500, 200, "sgd", 1e-3, "balanced"),
    }
    for variant, row in expected.items():
        settings = train_settings_of(guide, variant)
        got = (settings.batch_size, settings.epochs, settings.early_stopping_patience,
               settings.optimizer, settings.lr, settings.sampler)  # fmt: skip
        assert got == row, variant
    assert train_settings_of(guide, "gr_all").class_weights == (1.0, 1.7, 1.6)
    assert train_settings_of(guide, "rh_all") == train_settings_of(guide, "gr_all")
    network = guide["network"]
    assert network["densenet"]["block_config"] == [6, 12, 24, 16]  # DenseNet-121
    assert network["clam"]["hidden_dim"] == 512 and network["guidance"]["hidden_dims"] == [
        512,
        256,
        256,
    ]
    assert guide["inferior"]["crop_vox"] == [140, 220, 220]
    assert guide_paper["splits"]["schemes"][guide["split"]]["n_repeats"] == 5


# --------------------------------------------------------------------------- subspace fusion

#: The rows of the subspace-fusion paper's Tables 1 and 2, as printed.
KSFUSION_TABLE1 = ["AttMIL", "TransMIL", "SNN", "Concat", "Add", "Bilinear", "MCAT", "CMTA", "Ours"]
KSFUSION_TABLE2 = ["w/o Ge-Con", "w/o CG-Coord", "Ours"]
#: Their columns: five metrics for diagnosis and grading, the C-index for survival.
KSFUSION_COLUMNS = [
    f"{task}/{metric}"
    for task in ("diagnosis", "grading")
    for metric in ("AUC", "ACC", "REC", "SPE", "F1")
] + ["survival/C-index"]


@pytest.fixture(scope="module")
def ksfusion_paper():
    return load_config([*DEMO, PAPER / "ksfusion.yaml"])


@pytest.mark.parametrize("source", ["paper", "demo"])
def test_ksfusion_tables_hold_every_row_and_column_of_tables_1_and_2(source, ksfusion_paper):
    config = ksfusion_paper if source == "paper" else load_config(DEMO)
    settings = config["methods"]["ksfusion"]
    for name, printed in (("table1", KSFUSION_TABLE1), ("table2", KSFUSION_TABLE2)):
        table = settings["tables"][name]
        assert [table["labels"][row] for row in table["rows"]] == printed
        assert table["metrics"] == KSFUSION_COLUMNS
    variants = settings["variants"]
    assert variants["wo_gecon"]["options"] == {"use_gecon": False}
    assert variants["wo_cgcoord"]["cg_coord"] is False and variants["ours"]["cg_coord"] is None


def test_ksfusion_paper_settings_are_section_3_1_and_the_code(ksfusion_paper):
    from mmdiag.methods.ksfusion.settings import train_settings_of

    settings = ksfusion_paper["methods"]["ksfusion"]
    diagnosis = train_settings_of(settings, "ours", "diagnosis")
    survival = train_settings_of(settings, "ours", "survival")
    assert (diagnosis.epochs, survival.epochs) == (20, 10)
    for chosen in (diagnosis, survival):
        assert (chosen.batch_size, chosen.optimizer, chosen.lr) == (8, "adam", 1e-3)
        assert (chosen.weight_decay, chosen.scheduler) == (0.1, "cosine")
    assert diagnosis.class_weights == (1.0, 4.15, 2.93, 2.43)
    assert train_settings_of(settings, "snn", "grading").class_weights == (1.47, 1.51, 1.0)
    network = settings["network"]["ksfusion"]
    assert (network["heads"], network["head_dim"], network["offset_groups"]) == (8, 64, 8)
    assert network["gene_hidden"] == [64, 48, 32] and network["gene_dim"] == 128
    assert settings["slides"] == {"scale": None, "n_patches": 2500, "grid_cells": [50, 50]}
    assert settings["genes"]["top_variable_fraction"] == 0.3
    scheme = ksfusion_paper["splits"]["schemes"][settings["split"]]
    assert scheme["type"] == "holdout" and scheme["n_seeds"] == 3
    alphas = [
        settings["variants"][v]["options"].get("alpha", 0.5) for v in settings["figures"]["alpha"]
    ]
    assert alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
