"""leaf_xla: train and ensemble image classifiers for the Kaggle leaf competitions on TPUs."""

__version__ = "0.1.0"
