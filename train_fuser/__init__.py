"""Training and evaluation of fusion heads, installed as ``logitfuse.train_fuser``."""
