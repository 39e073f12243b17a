"""Training: FastSFTTrainer (trainer) with its metrics (token_stats) and optimizer groups (optim), the
preference trainers (preference_trainer, preference_variants), checkpoints and their integrity, faults
(non-finite steps, signals) and smart gradient checkpointing."""
