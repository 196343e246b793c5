"""avidfast: fast audio-visual instance discrimination (AVID) and cross-modal agreement (CMA).

Subpackages:
  avidfast.ops     fused memory-bank operators (C++/CUDA) and their plain-PyTorch references
  avidfast.losses  MemoryBank and AVIDLoss, drop-in nn.Modules built on the ops
"""

__version__ = "0.1.0"
