"""Checkpoint manager: atomic, verified, retained checkpoints (no MLX import at module top)."""
