"""Seeded synthetic demo cohort written in the formats real instruments produce."""

from mmdiag.synth.cohort import write_synthetic_cohort

__all__ = ["write_synthetic_cohort"]
