"""Training: the engine shared by pretraining and fine-tuning, losses, checkpoints, logging."""
