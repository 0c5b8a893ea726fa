"""MHD-Net (Zhang et al., IEEE JBHI 2024): a CT + WSI teacher distilled into a CT-only student.

``data`` (patients from the manifest, CT and WSI sequences of a fold), ``fold`` (the teacher,
student and CT-baseline trainers), ``figures`` (Figs. 5 and 6), ``settings``, ``workflow`` (the
rules' input functions) and ``cli`` (``mmdiag mhd ...``). The networks are
:mod:`mmdiag.models.mhd`.
"""
