"""DeepGuide (Mallya & Hamarneh, "Deep Multimodal Guidance for Medical Image Classification",
MICCAI 2022): an inferior-modality classifier guided by a superior modality's latent space.

``settings`` (kinds of variant, the supplement's training recipes), ``data`` (MR volumes, WSI
feature bags, latents), ``fold`` (the per-fold trainer), ``figures``, ``workflow`` (the rules'
input functions) and ``cli`` (``mmdiag guide ...``).
"""
