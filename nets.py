"""The model registry: every network the pipeline splits, behind one interface.

Device-side module (Python 3.6 + torch 1.10, no torchvision).  A network is named by its spec dict
(`{'name', 'num_classes', 'width_multiplier', 'small_input'}`, RepVGG.spec_dict() / ChainNet.spec_dict()) and is an
ordered list of blocks (`plan_of`) with split points at block boundaries.  RepVGG/HyperRepVGG blocks have up to 14
layouts; a plain network's blocks (chain_nets: mobilenet_v2, resnet18, resnet50) have one, layout 0, and the LUT,
cost model, exact split, gradient descent and sweep treat them as that 1-layout case.
"""
from typing import Dict, List, Optional, Sequence  # noqa: F401 - used in type comments

import chain_nets as CN
import hyper_repvgg as H

_ALIASES = {'mobilenetv2': 'mobilenet_v2', 'mobilenet-v2': 'mobilenet_v2', 'resnet-18': 'resnet18',
            'resnet-50': 'resnet50'}


def canonical_name(name):
    # type: (str) -> str
    """'A0' -> 'RepVGG-A0', 'MobileNetV2' -> 'mobilenet_v2'; KeyError naming the valid choices otherwise."""
    low = str(name).lower()
    low = _ALIASES.get(low, low)
    if low in CN.NETS:
        return low
    try:
        return H.arch_name(name)
    except KeyError:
        raise KeyError('unknown model {!r}; valid choices: {}, {}'.format(
            name, ', '.join(sorted(H.ARCHS)), ', '.join(CN.NETS))) from None


def is_plain(name):
    # type: (str) -> bool
    """True for a plain chain network (one layout per block, no branches to prune)."""
    return canonical_name(name) in CN.NETS


def plan_of(arch):
    # type: (Dict[str, object]) -> list
    """The blocks of spec `arch` in forward order (hyper_repvgg.BlockSpec or chain_nets.ChainBlockSpec)."""
    name = canonical_name(str(arch['name']))
    if name in CN.NETS:
        return CN.chain_plan(name, arch.get('width_multiplier'))
    return H.block_plan(name, arch.get('width_multiplier'), bool(arch.get('small_input', False)))


def build_model(arch, checkpoint=None):
    # type: (Dict[str, object], Optional[Dict[str, object]]) -> object
    """The network of spec `arch` built here (device build: torch-only blocks), base weights from `checkpoint` (a
    state dict) when given: a HyperRepVGG (alpha = 1) or a chain_nets.ChainNet."""
    name = canonical_name(str(arch['name']))
    if name in CN.NETS:
        model = CN.build_chain_net(dict(arch, name=name))
        if checkpoint is not None:
            model.load_base_state_dict(checkpoint)
        return model
    return H.build_hyper_repvgg(name, checkpoint, int(arch['num_classes']), arch.get('width_multiplier'),
                                bool(arch.get('small_input', False)))


def build_edge(arch, lam, state_dict, layouts):
    # type: (Dict[str, object], int, Dict[str, object], Sequence[int]) -> object
    """The deployed edge part (blocks [0, lam)) from the edge tensors and the layouts, on the device."""
    if is_plain(str(arch['name'])):
        if len(layouts) != lam or any(int(g) != CN.PLAIN_LAYOUT for g in layouts):
            raise ValueError('edge split lambda={} of a plain network needs {} layouts, all {}, got {}'.format(
                lam, lam, CN.PLAIN_LAYOUT, list(layouts)))
        return CN.build_chain_edge(dict(arch, name=canonical_name(str(arch['name']))), lam, state_dict)
    return H.build_edge(arch, lam, state_dict, layouts)
