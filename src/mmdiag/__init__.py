"""mmdiag: multi-modal, multi-scale medical image diagnosis, from raw images to paper tables."""

__version__ = "0.1.0"
