"""Statistical tests and agreement measures, checked against R to 1e-9 relative.

Every comparison the papers' tables make between a reference model and the others comes from
here: DeLong and bootstrap tests of correlated ROC curves, McNemar, the paired t-test, the
Wilcoxon signed-rank test, Harrell's C-index, quadratic weighted kappa, and the mean ± sample
standard deviation over folds. Results are frozen dataclasses with named fields.
"""

from mmdiag.stats.agreement import quadratic_weighted_kappa
from mmdiag.stats.folds import FoldSummary, fold_mean_std
from mmdiag.stats.paired import (
    McNemarResult,
    PairedTTestResult,
    WilcoxonResult,
    mcnemar_from_correctness,
    mcnemar_test,
    paired_ttest,
    wilcoxon_test,
)
from mmdiag.stats.roc import (
    AUCInterval,
    BootstrapResult,
    DeLongResult,
    auc_ci,
    bootstrap_auc_test,
    delong_test,
    delong_variance,
    multiclass_auc,
)
from mmdiag.stats.survival import ConcordanceResult, concordance_index

__all__ = [
    "AUCInterval",
    "BootstrapResult",
    "ConcordanceResult",
    "DeLongResult",
    "FoldSummary",
    "McNemarResult",
    "PairedTTestResult",
    "WilcoxonResult",
    "auc_ci",
    "bootstrap_auc_test",
    "concordance_index",
    "delong_test",
    "delong_variance",
    "fold_mean_std",
    "mcnemar_from_correctness",
    "mcnemar_test",
    "multiclass_auc",
    "paired_ttest",
    "quadratic_weighted_kappa",
    "wilcoxon_test",
]
