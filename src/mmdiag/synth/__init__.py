"""Seeded synthetic demo cohort written in the formats real instruments produce."""
