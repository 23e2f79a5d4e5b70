"""The one place torchvision is imported (server side only): the fallback dataset downloader and the server's build
of the plain networks (`torchvision_chain_net`).

torchvision 0.28's wheel in requirements.txt is built for CUDA; on a CPU-only torch its compiled operators
are missing and `import torchvision` fails with "operator torchvision::nms does not exist" (its fake-tensor
registrations look the schemas up).  `import_torchvision` declares the two schemas it needs
(`torchvision::nms`, `torchvision::qnms`, without kernels) when, and only when, they are missing, then
imports torchvision.  Where the compiled ops load, it declares nothing.  Never imported by device code.
"""
import importlib
from types import ModuleType
from typing import Any, Dict, List

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


def torchvision_chain_net(spec: Dict[str, Any]) -> Any:
    """chain_nets.ChainNet over torchvision's own modules for spec {'name': mobilenet_v2 | resnet18 | resnet50,
    'num_classes', 'width_multiplier'} (random weights, nothing downloaded): the server-side build."""
    import chain_nets as CN
    tv = import_torchvision()
    name = str(spec['name'])
    plan = CN.chain_plan(name, spec.get('width_multiplier'))  # checks the name and the width
    kwargs: Dict[str, Any] = {'weights': None, 'num_classes': int(spec['num_classes'])}
    if name == 'mobilenet_v2' and spec.get('width_multiplier') is not None:
        kwargs['width_mult'] = float(spec['width_multiplier'][0])
    net = getattr(tv.models, name)(**kwargs)
    model = CN.ChainNet(spec, net)
    assert len(plan) == model.num_blocks
    return model
