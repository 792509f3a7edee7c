"""Training: suffix prompts (and the LoRA baseline) with in-batch InfoNCE, and the bidirectional MNTP stage."""
