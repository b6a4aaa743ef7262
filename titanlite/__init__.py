"""titanlite: a minimal native-PyTorch trainer for pretraining LLaMA-style models."""

__version__ = "0.1.0"
