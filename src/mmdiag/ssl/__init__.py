"""Self-supervised pretraining of patch encoders (SimSiam), one encoder per magnification."""
