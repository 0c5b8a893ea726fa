"""A single-node SLURM cluster for tests, and the test profile that submits to it."""
