"""Cohort manifests and patient-level splits."""
