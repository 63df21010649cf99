"""kmodd: keeps out-of-tree kernel modules working across kernel upgrades."""

__version__ = "0.1.0"
