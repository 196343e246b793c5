"""Drop-in loss modules built on avidfast.ops."""
from avidfast.losses.avid import AVIDLoss
from avidfast.losses.cma import CMALoss
from avidfast.losses.memory_bank import MemoryBank
from avidfast.losses.memory_nce import MemoryNCE

__all__ = ["AVIDLoss", "CMALoss", "MemoryBank", "MemoryNCE"]
