"""multitune: multi-task training and fine-tuning of one shared model."""

__version__ = "0.1.0"
