"""The trainer: the shared optimizer step (train_step), the SFT warm start (sft) and the RL loop.

Kept import-light: submodules are imported by their users (`from rlx.trainer.train_step import ...`).
"""
