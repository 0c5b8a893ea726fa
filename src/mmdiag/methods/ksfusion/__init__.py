"""Knowledge-driven subspace fusion (Zhang, Wang, Meng, Tang, Li, "Knowledge-driven Subspace
Fusion and Gradient Coordination for Multi-modal Learning", MICCAI 2024): WSI patch features
and tumour / microenvironment gene subspaces for diagnosis, grading and survival.

``settings`` (variants, the paper's recipes), ``data`` (tissue samples: patch sets, feature
grids, the gene space fitted on the training samples), ``fold`` (the per-fold trainer),
``figures``, ``workflow`` (the rules' input functions) and ``cli`` (``mmdiag ksfusion ...``).
"""
