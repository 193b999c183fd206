"""mathlora-daemon: resumable LoRA fine-tuning for MLX, built to run unattended overnight."""

__version__ = "0.1.0"
