"""Per-fold training, prediction and the files each fold leaves behind."""
