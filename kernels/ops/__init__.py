"""Our kernels as PyTorch operators, one module per operator family.

Importing this package registers every family's CUDA source
(``kernels.cuda_sources.load_all``) and its ``torch.library`` operators.
"""

from kernels.ops import deform_conv2d  # noqa: F401  (registers its source and ops)
