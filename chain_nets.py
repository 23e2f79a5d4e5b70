"""Plain chain networks (MobileNetV2, ResNet-18, ResNet-50) as ordered blocks, split at block boundaries.

Device-side module: Python 3.6 + PyTorch 1.10, never imports torchvision, prints nothing.  Its block classes
are small torch-only definitions whose state-dict keys equal torchvision's (`features.3.conv.0.0.weight`,
`layer2.1.bn2.running_var`, ...), so a torchvision checkpoint loads into them strictly and an edge part built here
computes what torchvision's blocks compute (tests/test_chain_nets.py checks it at every split point).  The server
builds the same networks with torchvision itself (nets.build_model) and wraps them in the same `ChainNet`.

Blocks, in forward order (docs/design.md#plain-networks):
  * mobilenet_v2: `features.0` .. `features.18` (19 blocks), then pooling + classifier;
  * resnet18 / resnet50: `stem` (conv1, bn1, relu, maxpool), every residual block `layer1.0` .. `layer4.*`, then
    pooling + fc.
A plain block has one layout, gamma 0 (its only "branch" is itself, 'D'); it has no hyper-weights and nothing to
prune.  The split lambda (0..N) puts blocks [0, lambda) on the edge, [lambda, N) + head on the server.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple  # noqa: F401 - used in type comments

import torch
import torch.nn as nn

PLAIN_LAYOUT = 0  # the one layout of a plain block (hyper_repvgg.LAYOUTS[0]: branch set {'D'})


class ChainBlockSpec(NamedTuple):
    index: int  # global block number, 0 = first
    name: str  # module path as in torchvision ('features.3', 'layer2.1'; 'stem' = conv1 + bn1 + relu + maxpool)
    kind: str  # 'conv_bn_act' | 'inverted_residual' | 'stem' | 'basic' | 'bottleneck'
    in_channels: int
    out_channels: int
    stride: int  # total spatial stride of the block (stem: 4 = conv 2 x maxpool 2)
    groups: int  # always 1 (the depthwise conv inside an inverted residual is part of the block)
    kernel: int  # conv_bn_act: its kernel size; stem: 7; else 3 (the block's spatial conv)
    hidden: int  # inverted residual: expanded channels; bottleneck: its width; else out_channels
    shortcut: bool  # inverted residual: x + f(x); basic/bottleneck: a downsample conv on the shortcut

    @property
    def has_identity(self):
        # type: () -> bool
        return False  # no RepVGG identity branch

    @property
    def plain(self):
        # type: () -> bool
        return True


def _make_divisible(v, divisor=8, min_value=None):
    # type: (float, int, Optional[int]) -> int
    """torchvision's channel rounding (mobilenetv2._make_divisible)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


_MBV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))  # t, c, n, s as torchvision


def mobilenet_v2_plan(width_mult=1.0):
    # type: (float) -> List[ChainBlockSpec]
    c_in = _make_divisible(32 * width_mult)
    last = _make_divisible(1280 * max(1.0, width_mult))
    plan = [ChainBlockSpec(0, 'features.0', 'conv_bn_act', 3, c_in, 2, 1, 3, c_in, False)]
    for t, c, n, s in _MBV2_SETTING:
        c_out = _make_divisible(c * width_mult)
        for i in range(n):
            stride = s if i == 0 else 1
            k = len(plan)
            plan.append(ChainBlockSpec(k, 'features.{}'.format(k), 'inverted_residual', c_in, c_out, stride, 1, 3,
                                       int(round(c_in * t)), stride == 1 and c_in == c_out))
            c_in = c_out
    k = len(plan)
    plan.append(ChainBlockSpec(k, 'features.{}'.format(k), 'conv_bn_act', c_in, last, 1, 1, 1, last, False))
    return plan


_RESNETS = {'resnet18': ('basic', (2, 2, 2, 2)), 'resnet50': ('bottleneck', (3, 4, 6, 3))}


def resnet_plan(name):
    # type: (str) -> List[ChainBlockSpec]
    kind, depths = _RESNETS[name]
    expansion = 4 if kind == 'bottleneck' else 1
    plan = [ChainBlockSpec(0, 'stem', 'stem', 3, 64, 4, 1, 7, 64, False)]
    c_in = 64
    for stage, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512)), start=1):
        for j in range(depth):
            stride = 2 if stage > 1 and j == 0 else 1
            c_out = width * expansion
            plan.append(ChainBlockSpec(len(plan), 'layer{}.{}'.format(stage, j), kind, c_in, c_out, stride, 1, 3,
                                       width, stride != 1 or c_in != c_out))
            c_in = c_out
    return plan


NETS = ('mobilenet_v2', 'resnet18', 'resnet50')  # the plain networks (names as torchvision's builders)


def chain_plan(name, width_multiplier=None):
    # type: (str, Optional[Sequence[float]]) -> List[ChainBlockSpec]
    """Blocks of plain network `name`.  width_multiplier: None, or (mobilenet_v2 only) values that are all equal,
    torchvision's width_mult."""
    if name not in NETS:
        raise KeyError('unknown plain network {!r}; valid choices: {}'.format(name, ', '.join(NETS)))
    wm = None if width_multiplier is None else tuple(float(w) for w in width_multiplier)
    if name == 'mobilenet_v2':
        if wm is not None and (not wm or len(set(wm)) != 1 or wm[0] <= 0):
            raise ValueError('mobilenet_v2 takes one width multiplier (all values equal, > 0), got {!r}'.format(
                width_multiplier))
        return mobilenet_v2_plan(1.0 if wm is None else wm[0])
    if wm is not None:
        raise ValueError('{} has no width multiplier; set it to none, got {!r}'.format(name, width_multiplier))
    return resnet_plan(name)


# ----------------------------------------------------------------------------------------------------------
# Torch-only block definitions with torchvision's module names
# ----------------------------------------------------------------------------------------------------------

def _conv_bn_act(c_in, c_out, k, stride, groups=1, act=True):
    # type: (int, int, int, int, int, bool) -> nn.Sequential
    """torchvision's Conv2dNormActivation (conv, bn, ReLU6) with keys 0.*, 1.*."""
    layers = [nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """torchvision.models.mobilenetv2.InvertedResidual: keys conv.0.0 (expand) ... conv.N (project bn)."""

    def __init__(self, spec):
        # type: (ChainBlockSpec) -> None
        super(InvertedResidual, self).__init__()
        layers = []  # type: List[nn.Module]
        if spec.hidden != spec.in_channels:
            layers.append(_conv_bn_act(spec.in_channels, spec.hidden, 1, 1))
        layers += [_conv_bn_act(spec.hidden, spec.hidden, 3, spec.stride, groups=spec.hidden),
                   nn.Conv2d(spec.hidden, spec.out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(spec.out_channels)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = bool(spec.shortcut)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class Stem(nn.Module):
    """ResNet's conv1, bn1, relu, maxpool as one block (their keys stay conv1.*, bn1.* in the network)."""

    def __init__(self, conv1, bn1, relu, maxpool):
        # type: (nn.Module, nn.Module, nn.Module, nn.Module) -> None
        super(Stem, self).__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = conv1, bn1, relu, maxpool

    def forward(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def stem_layers():
    # type: () -> Tuple[nn.Module, nn.Module, nn.Module, nn.Module]
    return (nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1))


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock (keys conv1, bn1, conv2, bn2, downsample.0/1)."""

    def __init__(self, spec):
        # type: (ChainBlockSpec) -> None
        super(BasicBlock, self).__init__()
        self.conv1 = nn.Conv2d(spec.in_channels, spec.out_channels, 3, spec.stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(spec.out_channels, spec.out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(spec.out_channels)
        self.downsample = _downsample(spec)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (ResNet v1.5: the stride on conv2)."""

    def __init__(self, spec):
        # type: (ChainBlockSpec) -> None
        super(Bottleneck, self).__init__()
        w = spec.hidden
        self.conv1 = nn.Conv2d(spec.in_channels, w, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, spec.stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.conv3 = nn.Conv2d(w, spec.out_channels, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(spec.out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(spec)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _downsample(spec):
    # type: (ChainBlockSpec) -> Optional[nn.Module]
    if not spec.shortcut:
        return None
    return nn.Sequential(nn.Conv2d(spec.in_channels, spec.out_channels, 1, spec.stride, 0, bias=False),
                         nn.BatchNorm2d(spec.out_channels))


def make_block(spec):
    # type: (ChainBlockSpec) -> nn.Module
    """The torch-only module of one block (stem: a Stem over fresh conv1/bn1/relu/maxpool)."""
    if spec.kind == 'conv_bn_act':
        return _conv_bn_act(spec.in_channels, spec.out_channels, spec.kernel, spec.stride)
    if spec.kind == 'inverted_residual':
        return InvertedResidual(spec)
    if spec.kind == 'stem':
        return Stem(*stem_layers())
    if spec.kind == 'basic':
        return BasicBlock(spec)
    if spec.kind == 'bottleneck':
        return Bottleneck(spec)
    raise ValueError('unknown block kind {!r} of block {} ({})'.format(spec.kind, spec.index, spec.name))


def block_keys(spec, block):
    # type: (ChainBlockSpec, nn.Module) -> Dict[str, str]
    """{key inside the block module: key in the network (torchvision's)} for every tensor of one block."""
    out = {}
    for k in block.state_dict():
        out[k] = k if spec.kind == 'stem' else spec.name + '.' + k
    return out


class _Mirror(nn.Module):
    """A network with torchvision's attribute names, assembled from make_block modules (the device's build)."""

    def __init__(self, name, plan, num_classes):
        # type: (str, List[ChainBlockSpec], int) -> None
        super(_Mirror, self).__init__()
        if name == 'mobilenet_v2':
            self.features = nn.Sequential(*[make_block(s) for s in plan])
            self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(plan[-1].out_channels, num_classes))
            return
        self.conv1, self.bn1, self.relu, self.maxpool = stem_layers()
        for stage in range(1, 5):
            prefix = 'layer{}.'.format(stage)
            setattr(self, 'layer{}'.format(stage), nn.Sequential(*[make_block(s) for s in plan
                                                                  if s.name.startswith(prefix)]))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(plan[-1].out_channels, num_classes)


class ChainNet(nn.Module):
    """A plain chain network: torchvision's modules (server) or the _Mirror's (device) under their own names, so
    state_dict() has torchvision's keys; `blocks` in forward order, `split(lam)` as HyperRepVGG.split."""

    plain = True

    def __init__(self, spec, net):
        # type: (Dict[str, object], nn.Module) -> None
        super(ChainNet, self).__init__()
        self.arch = str(spec['name'])
        self.num_classes = int(spec['num_classes'])
        self.width_multiplier = None if spec.get('width_multiplier') is None else tuple(
            float(w) for w in spec['width_multiplier'])
        self.small_input = False
        self.plan = chain_plan(self.arch, self.width_multiplier)
        for name, child in net.named_children():
            self.add_module(name, child)
        if self.arch == 'mobilenet_v2':
            blocks = list(self.features)
            self.gap = nn.AdaptiveAvgPool2d((1, 1))
        else:
            blocks = [Stem(self.conv1, self.bn1, self.relu, self.maxpool)]
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                blocks.extend(stage)
            self.gap = self.avgpool
        if len(blocks) != len(self.plan):
            raise ValueError('{}: the network has {} blocks, its plan {}'.format(self.arch, len(blocks), len(self.plan)))
        for s, b in zip(self.plan, blocks):
            b.spec = s
        self._blocks = blocks  # a plain list: the modules are registered under their torchvision names above

    @property
    def linear(self):
        # type: () -> nn.Linear
        """The classifier's Linear (MobileNetV2's dropout before it is the identity in eval)."""
        return self.classifier[1] if self.arch == 'mobilenet_v2' else self.fc

    @property
    def blocks(self):
        # type: () -> List[nn.Module]
        return list(self._blocks)

    @property
    def num_blocks(self):
        # type: () -> int
        return len(self.plan)

    def spec_dict(self):
        # type: () -> Dict[str, object]
        return {'name': self.arch, 'num_classes': self.num_classes,
                'width_multiplier': None if self.width_multiplier is None else list(self.width_multiplier),
                'small_input': False}

    def forward_head(self, h):
        # type: (torch.Tensor) -> torch.Tensor
        h = torch.flatten(self.gap(h), 1)
        return self.classifier(h) if self.arch == 'mobilenet_v2' else self.fc(h)

    def forward(self, x):
        for block in self._blocks:
            x = block(x)
        return self.forward_head(x)

    # the HyperRepVGG interface, for a network whose every block has one layout and nothing to prune
    def layouts(self):
        # type: () -> List[int]
        return [PLAIN_LAYOUT] * self.num_blocks

    def valid_layouts(self, k):
        # type: (int) -> List[int]
        return [PLAIN_LAYOUT]

    def kept(self, k):
        # type: (int) -> frozenset
        return frozenset('D')

    def check_config(self, gammas):
        # type: (Sequence[int]) -> None
        if len(gammas) != self.num_blocks:
            raise ValueError('need {} layouts, got {}'.format(self.num_blocks, len(gammas)))
        bad = [k for k, g in enumerate(gammas) if int(g) != PLAIN_LAYOUT]
        if bad:
            raise ValueError('{} is a plain network: every block runs layout {}, block {} ({}) got {}'.format(
                self.arch, PLAIN_LAYOUT, bad[0], self.plan[bad[0]].name, gammas[bad[0]]))

    def alpha_parameters(self):
        # type: () -> List[nn.Parameter]
        return []

    def split(self, lam):
        # type: (int) -> tuple
        """(edge, server) hyper_repvgg.SplitPart: blocks [0, lam) and [lam, N) + pooling + classifier."""
        from hyper_repvgg import SplitPart
        if not 0 <= lam <= self.num_blocks:
            raise ValueError('split lambda={} out of range 0..{}'.format(lam, self.num_blocks))
        return SplitPart(self._blocks[:lam], None), SplitPart(self._blocks[lam:], (self.gap, self.linear))

    def edge_state_dict(self, lam):
        # type: (int) -> Dict[str, torch.Tensor]
        """torchvision-named tensors of blocks [0, lam) only."""
        out = {}
        for s, b in zip(self.plan[:lam], self._blocks[:lam]):
            sd = b.state_dict()
            out.update({net_key: sd[k] for k, net_key in block_keys(s, b).items()})
        return out

    def load_base_state_dict(self, state_dict):
        # type: (Dict[str, torch.Tensor]) -> None
        """A torchvision state dict (after hyper_repvgg.checkpoint_filter_fn), loaded strictly."""
        from hyper_repvgg import checkpoint_filter_fn
        state_dict = checkpoint_filter_fn(state_dict)
        own = set(self.state_dict())
        missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
        if missing or unexpected:
            raise KeyError('checkpoint does not match {} ({} classes): missing {} unexpected {}'.format(
                self.arch, self.num_classes, missing[:5], unexpected[:5]))
        self.load_state_dict(state_dict, strict=True)


def build_chain_net(spec):
    # type: (Dict[str, object]) -> ChainNet
    """The device's build of a plain network (torch-only blocks, torchvision's keys), random weights."""
    plan = chain_plan(str(spec['name']), spec.get('width_multiplier'))
    return ChainNet(spec, _Mirror(str(spec['name']), plan, int(spec['num_classes'])))


def build_chain_edge(spec, lam, state_dict):
    # type: (Dict[str, object], int, Dict[str, torch.Tensor]) -> nn.Module
    """Blocks [0, lam) of a plain network from their torchvision-named tensors (exactly those keys), as a
    hyper_repvgg.SplitPart; only these blocks are allocated."""
    from hyper_repvgg import SplitPart
    plan = chain_plan(str(spec['name']), spec.get('width_multiplier'))
    if not 0 <= lam <= len(plan):
        raise ValueError('edge split lambda={} out of range 0..{}'.format(lam, len(plan)))
    blocks, used = [], set()
    for s in plan[:lam]:
        b = make_block(s)
        keys = block_keys(s, b)
        missing = [net for net in keys.values() if net not in state_dict]
        if missing:
            raise ValueError('edge tensors lack {} of block {} ({})'.format(missing[:3], s.index, s.name))
        b.load_state_dict({k: state_dict[net] for k, net in keys.items()}, strict=True)
        used.update(keys.values())
        b.spec = s
        blocks.append(b.eval())
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise ValueError('edge tensors include keys beyond block {}: {}'.format(lam - 1, unknown[:5]))
    return SplitPart(blocks, None).eval()
