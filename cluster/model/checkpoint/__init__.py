"""gpt-oss checkpoints on disk: the layout map (layout.py), a random writer (random_writer.py) and
the loader (loader.py)."""

from cluster.model.checkpoint.layout import HF_INDEX, LAYOUTS, CheckpointError
from cluster.model.checkpoint.loader import describe_checkpoint, load_model, verify_checkpoint
from cluster.model.checkpoint.random_writer import save_checkpoint, write_checkpoint

__all__ = ["HF_INDEX", "LAYOUTS", "CheckpointError", "describe_checkpoint", "load_model", "verify_checkpoint",
           "save_checkpoint", "write_checkpoint"]
