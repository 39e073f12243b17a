"""fusetune: fast, correct supervised fine-tuning on TRL."""

__version__ = "0.1.0"
