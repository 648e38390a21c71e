"""unift: one command line for parameter-efficient fine-tuning of large language models."""

__version__ = "0.1.0"
