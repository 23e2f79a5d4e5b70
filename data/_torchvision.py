"""The one place torchvision is imported (server side only, as a fallback dataset downloader).

torchvision 0.28's wheel in requirements.txt is built for CUDA; on a CPU-only torch its compiled operators
are missing and `import torchvision` fails with "operator torchvision::nms does not exist" (its fake-tensor
registrations look the schemas up).  `import_torchvision` declares the two schemas it needs
(`torchvision::nms`, `torchvision::qnms`, without kernels) when, and only when, they are missing, then
imports torchvision.  Where the compiled ops load, it declares nothing.  Never imported by device code.
"""
import importlib
from types import ModuleType
from typing import List

import torch

_SCHEMAS = {
    'nms': 'nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
    'qnms': 'qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
}
_LIBRARIES: List[object] = []  # keeps the declared schemas alive for the process



def _declared(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def import_torchvision() -> ModuleType:
    """Import torchvision, first declaring the op schemas its import needs if this torch lacks them."""
    try:
        return importlib.import_module('torchvision')
    except RuntimeError as e:
        if 'torchvision::' not in str(e):
            raise
    # The failed import may have left partial modules behind; drop them before retrying.
    import sys
    for mod in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
        del sys.modules[mod]
    missing = [n for n in _SCHEMAS if not _declared(n)]
    if missing:
        lib = torch.library.Library('torchvision', 'DEF')
        for n in missing:
            lib.define(_SCHEMAS[n])
        _LIBRARIES.append(lib)
    return importlib.import_module('torchvision')
