"""deepfuse: Deep Fusion checkpoint surgery (widen models by fusing trained checkpoints)."""

__version__ = "0.1.0"
