"""Trainers: ``pretrain`` (next-token + MTP pretraining and SFT), ``grpo`` and ``ppo``."""
