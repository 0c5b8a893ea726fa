"""CS-MIL (Deng et al., Medical Image Analysis 2024): cross-scale attention MIL over 20x/10x/5x.

``data`` (per-patient features and clusters), ``bags`` (phenotype-stratified bags), ``fold``
(per-split training and testing), ``figures`` (ROC/PR, attention maps), ``toy_table`` (Table 5),
``cli`` (``mmdiag csmil ...``). The networks are :mod:`mmdiag.models.csmil`.
"""
