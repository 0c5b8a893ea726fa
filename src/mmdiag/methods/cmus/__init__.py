"""CMUS-Net (Long et al., Medical Image Analysis 2025): OM + IM + a bag of TEM images per patient.

``segmentation`` (the OM glomerulus step), ``data`` (patient samples), ``fold`` (per-fold
training and late votes), ``figures`` (the paper's figures), ``cli`` (``mmdiag cmus ...``).
The network is :mod:`mmdiag.models.cmus`.
"""
