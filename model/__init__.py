"""The networks, one file each, in the official checkpoints' key names, and what they share (rope.py, tiling.py).

Nothing here imports a module outside model/: a network file stands alone.
"""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""
