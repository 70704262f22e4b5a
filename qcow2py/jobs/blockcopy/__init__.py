"""Block-copy: plan a copy from metadata, read in host order, write the target."""

from .blockcopy import BlockCopy, CopyStats, ORDERS

__all__ = ["BlockCopy", "CopyStats", "ORDERS"]
