"""The kinds of MHD-Net variant (``model``) and what each reads, without importing a network.

Kept apart from :mod:`.settings` so that the workflow's input functions use the same
definitions without importing torch.
"""

from __future__ import annotations

#: Every kind: MHD-Net's teacher and student, the CT baseline and the comparison methods of
#: Tables III (mmformer, moddrop, sckd) and IV (pcct).
KINDS = ("teacher", "student", "ct_resnet", "mmformer", "moddrop", "sckd", "pcct")
#: Kinds trained against a teacher variant's checkpoint of the same fold.
TEACHER_READERS = ("student", "sckd")
#: Kinds whose test model is ``model.deploy()`` (the trained part, without the teacher).
DEPLOYED = ("student", "sckd")
#: Kinds that never open a slide.
CT_ONLY_KINDS = ("ct_resnet", "pcct")
#: Kinds whose network holds a teacher, so one memory must fit the teacher's stages.
TEACHER_NETWORKS = ("teacher", "student", "sckd")
