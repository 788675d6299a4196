"""Our kernels as PyTorch operators, one module per operator family.

Importing this package imports every module in it; each registers its CUDA
source (``kernels.cuda_sources.load_all``) and its ``torch.library``
operators, so adding a family is adding a module.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
