"""RepVGG and HyperRepVGG: the model, its 14 block layouts and its split into edge and server parts.

Device-side module: runs on Python 3.6 + PyTorch 1.10 + numpy (Jetson TX2, JetPack 4.6), never imports
torchvision, and prints nothing.

Vocabulary (see docs/design.md#model):
  * blocks are numbered 0 .. N-1 in forward order, 0 = stage0;
  * branches are 'D' (3x3 dense conv+BN), 'O' (1x1 conv+BN) and 'I' (identity BN, only when in == out
    channels and stride 1); each block of a HyperRepVGG scales them by hyper-weights alpha_D, alpha_O, alpha_I;
  * a layout gamma (0..13) says how the kept branches are executed: which of them are fused into one kernel
    and which run as separate parts whose outputs are summed.  All valid layouts compute the same function;
  * the split lambda (0..N) puts blocks [0, lambda) on the edge and [lambda, N) + pooling + classifier on the server.
"""
import copy
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple  # noqa: F401 - used in type comments

import torch
import torch.nn as nn
import torch.nn.functional as F

BRANCHES = ('D', 'O', 'I')  # order of the hyper-weights in every per-block vector


class ArchSpec(NamedTuple):
    depths: Tuple[int, int, int, int]  # blocks in stage1..stage4 (stage0 is one block)
    widths: Tuple[float, float, float, float]  # width multipliers of stage1..stage4
    groups: int  # groups of the optional grouped blocks (1 = dense everywhere)


_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)
ARCHS = {
    'RepVGG-A0': ArchSpec(_A, (0.75, 0.75, 0.75, 2.5), 1),
    'RepVGG-A1': ArchSpec(_A, (1.0, 1.0, 1.0, 2.5), 1),
    'RepVGG-A2': ArchSpec(_A, (1.5, 1.5, 1.5, 2.75), 1),
    'RepVGG-B0': ArchSpec(_B, (1.0, 1.0, 1.0, 2.5), 1),
    'RepVGG-B1': ArchSpec(_B, (2.0, 2.0, 2.0, 4.0), 1),
    'RepVGG-B1g2': ArchSpec(_B, (2.0, 2.0, 2.0, 4.0), 2),
    'RepVGG-B1g4': ArchSpec(_B, (2.0, 2.0, 2.0, 4.0), 4),
    'RepVGG-B2': ArchSpec(_B, (2.5, 2.5, 2.5, 5.0), 1),
    'RepVGG-B2g4': ArchSpec(_B, (2.5, 2.5, 2.5, 5.0), 4),
    'RepVGG-B3': ArchSpec(_B, (3.0, 3.0, 3.0, 5.0), 1),
    'RepVGG-B3g2': ArchSpec(_B, (3.0, 3.0, 3.0, 5.0), 2),
    'RepVGG-B3g4': ArchSpec(_B, (3.0, 3.0, 3.0, 5.0), 4),
}


def arch_name(name):
    # type: (str) -> str
    """Canonical architecture name: 'A0', 'repvgg-a0' and 'RepVGG-A0' all mean 'RepVGG-A0'."""
    for key in ARCHS:
        if name.lower() in (key.lower(), key.lower()[len('repvgg-'):]):
            return key
    raise KeyError('unknown RepVGG architecture {!r}; valid choices: {}'.format(name, ', '.join(sorted(ARCHS))))


def grouped_block(index, groups):
    # type: (int, int) -> int
    """Groups of block `index` (global numbering): the official g2/g4 variants group every even block 2..26."""
    return groups if groups > 1 and index % 2 == 0 and 2 <= index <= 26 else 1


class BlockSpec(NamedTuple):
    index: int  # global block number, 0 = stage0
    name: str  # official module path, e.g. 'stage1.0'
    in_channels: int
    out_channels: int
    stride: int
    groups: int

    @property
    def has_identity(self):
        # type: () -> bool
        return self.in_channels == self.out_channels and self.stride == 1


def block_plan(name, width_multiplier=None, small_input=False):
    # type: (str, Optional[Sequence[float]], bool) -> List[BlockSpec]
    """The blocks of architecture `name` in forward order, as the official RepVGG constructor makes them.

    `width_multiplier` (4 floats) replaces the architecture's widths; None keeps them.  `small_input`
    gives stage0 stride 1, for 32x32-class inputs (the other strides stay at 2).
    """
    spec = ARCHS[arch_name(name)]
    widths = spec.widths if width_multiplier is None else tuple(float(w) for w in width_multiplier)
    if len(widths) != 4 or any(w <= 0 for w in widths):
        raise ValueError('width_multiplier must be 4 positive floats, got {!r}'.format(width_multiplier))
    in_planes = min(64, int(64 * widths[0]))
    plan = [BlockSpec(0, 'stage0', 3, in_planes, 1 if small_input else 2, 1)]
    for stage, (depth, base) in enumerate(zip(spec.depths, (64, 128, 256, 512)), start=1):
        planes = int(base * widths[stage - 1])
        for j in range(depth):
            index = len(plan)
            plan.append(BlockSpec(index, 'stage{}.{}'.format(stage, j), in_planes, planes, 2 if j == 0 else 1,
                                  grouped_block(index, spec.groups)))
            in_planes = planes
    return plan


# ----------------------------------------------------------------------------------------------------------
# Kernel algebra: pure functions, the only place BN folding and kernel padding are written.
# ----------------------------------------------------------------------------------------------------------

def bn_scale_shift(bn):
    # type: (nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]
    """Per-channel (scale, shift) of an inference-mode BatchNorm: bn(x) = x * scale + shift."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return scale, bn.bias - bn.running_mean * scale


def fuse_conv_bn(weight, bn):
    # type: (torch.Tensor, nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]
    """Fold an inference-mode BN into the bias-free conv kernel `weight`: returns (kernel, bias)."""
    scale, shift = bn_scale_shift(bn)
    return weight * scale.reshape(-1, 1, 1, 1), shift


def pad_kernel(kernel, k):
    # type: (torch.Tensor, int) -> torch.Tensor
    """Zero-pad a square kernel to k x k, keeping it centred (1x1 -> 3x3 puts it at the centre)."""
    pad = (k - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad, pad, pad, pad]) if pad > 0 else kernel


def identity_kernel(channels, groups, like, k=1):
    # type: (int, int, torch.Tensor, int) -> torch.Tensor
    """The k x k kernel of a (grouped) conv that maps x to x: shape (channels, channels // groups, k, k)."""
    per_group = channels // groups
    kernel = like.new_zeros((channels, per_group, k, k))
    rows = torch.arange(channels, device=like.device)
    kernel[rows, rows % per_group, k // 2, k // 2] = 1.0
    return kernel


# ----------------------------------------------------------------------------------------------------------
# The 14 layouts
# ----------------------------------------------------------------------------------------------------------

class Layout(NamedTuple):
    gamma: int
    parts: Tuple[Tuple[str, ...], ...]  # each part is one kernel: the branches fused into it
    description: str

    @property
    def branches(self):
        # type: () -> frozenset
        return frozenset(b for part in self.parts for b in part)


LAYOUTS = (
    Layout(0, (('D',),), 'D: one 3x3 conv'),
    Layout(1, (('O',),), 'O: one 1x1 conv'),
    Layout(2, (('I',),), 'I: per-channel scale + shift'),
    Layout(3, (('D',), ('O',)), 'D,O parallel'),
    Layout(4, (('D', 'O'),), 'D,O fused into one 3x3'),
    Layout(5, (('D',), ('I',)), 'D,I parallel'),
    Layout(6, (('D', 'I'),), 'D,I fused into one 3x3'),
    Layout(7, (('O',), ('I',)), 'O,I parallel'),
    Layout(8, (('O', 'I'),), 'O,I fused into one 1x1'),
    Layout(9, (('D',), ('O',), ('I',)), 'D,O,I parallel (train-time form)'),
    Layout(10, (('D', 'O'), ('I',)), 'fused(D+O) 3x3 + separate identity'),
    Layout(11, (('D', 'I'), ('O',)), 'fused(D+I) 3x3 + separate 1x1'),
    Layout(12, (('O', 'I'), ('D',)), 'fused(O+I) 1x1 + separate 3x3'),
    Layout(13, (('D', 'O', 'I'),), 'D,O,I fused into one 3x3 (deploy form)'),
)
NUM_LAYOUTS = len(LAYOUTS)


def layouts_for(kept):
    # type: (Sequence[str]) -> List[int]
    """The layouts valid for a kept branch set: those whose branch set equals it."""
    kept = frozenset(kept)
    return [lay.gamma for lay in LAYOUTS if lay.branches == kept]


def parallel_layout(kept):
    # type: (Sequence[str]) -> int
    """The layout that runs every kept branch separately (the train-time form)."""
    return min(layouts_for(kept), key=lambda g: -len(LAYOUTS[g].parts))


def fused_layout(kept):
    # type: (Sequence[str]) -> int
    """The layout that runs every kept branch as one kernel (the deploy form)."""
    return min(layouts_for(kept), key=lambda g: len(LAYOUTS[g].parts))


def part_kind(part):
    # type: (Sequence[str]) -> str
    """'conv3' if the part holds D, 'conv1' if it holds O but not D, 'affine' for identity alone."""
    return 'conv3' if 'D' in part else ('conv1' if 'O' in part else 'affine')


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------

def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups):
    # type: (int, int, int, int, int, int) -> nn.Sequential
    seq = nn.Sequential()
    seq.add_module('conv', nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                     groups=groups, bias=False))
    seq.add_module('bn', nn.BatchNorm2d(out_channels))
    return seq


class RepVGGBlock(nn.Module):
    """The official train-time block: ReLU(dense3x3(x) + conv1x1(x) + BN(x)); state_dict keys as official."""

    def __init__(self, spec):
        # type: (BlockSpec) -> None
        super(RepVGGBlock, self).__init__()
        self.spec = spec
        self.nonlinearity = nn.ReLU()
        self.rbr_identity = nn.BatchNorm2d(spec.in_channels) if spec.has_identity else None
        self.rbr_dense = conv_bn(spec.in_channels, spec.out_channels, 3, spec.stride, 1, spec.groups)
        self.rbr_1x1 = conv_bn(spec.in_channels, spec.out_channels, 1, spec.stride, 0, spec.groups)

    def branch_output(self, branch, x):
        # type: (str, torch.Tensor) -> torch.Tensor
        """One branch in its train-time form (conv then BN)."""
        module = {'D': self.rbr_dense, 'O': self.rbr_1x1, 'I': self.rbr_identity}[branch]
        return module(x)

    def forward(self, x):
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)


def branch_kernel(block, branch, k):
    # type: (RepVGGBlock, str, int) -> Tuple[torch.Tensor, torch.Tensor]
    """BN-folded (kernel, bias) of one branch, as a k x k kernel."""
    if branch == 'D':
        kernel, bias = fuse_conv_bn(block.rbr_dense.conv.weight, block.rbr_dense.bn)
    elif branch == 'O':
        kernel, bias = fuse_conv_bn(block.rbr_1x1.conv.weight, block.rbr_1x1.bn)
    else:
        eye = identity_kernel(block.spec.in_channels, block.spec.groups, block.rbr_dense.conv.weight, 1)
        kernel, bias = fuse_conv_bn(eye, block.rbr_identity)
    return pad_kernel(kernel, k), bias


def part_tensors(block, part, alpha):
    # type: (RepVGGBlock, Sequence[str], Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]
    """(weight, bias) of one part of a layout, alpha-scaled and fused.

    conv parts: weight is a (out, in/groups, k, k) kernel; affine parts (identity alone): weight is the
    per-channel scale.  `alpha` is the block's (3,) hyper-weight vector, or None for the plain RepVGG.
    Differentiable with respect to alpha.
    """
    kind = part_kind(part)
    weight, bias = None, None
    for branch in part:
        a = 1.0 if alpha is None else alpha[BRANCHES.index(branch)]
        if kind == 'affine':
            w, b = bn_scale_shift(block.rbr_identity)
        else:
            w, b = branch_kernel(block, branch, 3 if kind == 'conv3' else 1)
        weight = a * w if weight is None else weight + a * w
        bias = a * b if bias is None else bias + a * b
    return weight, bias


def run_part(kind, weight, bias, x, stride, groups):
    # type: (str, torch.Tensor, torch.Tensor, torch.Tensor, int, int) -> torch.Tensor
    """Execute one part: a 3x3 conv, a 1x1 conv, or a per-channel affine."""
    if kind == 'affine':
        return torch.addcmul(bias.reshape(1, -1, 1, 1), x, weight.reshape(1, -1, 1, 1))
    return F.conv2d(x, weight, bias, stride, 1 if kind == 'conv3' else 0, 1, groups)


class HyperRepVGGBlock(RepVGGBlock):
    """A RepVGG block with hyper-weights alpha (D, O, I), a kept-branch mask and an execution layout.

    State: `alpha` (3,) trainable; `kept` (3,) bool buffer.  `layout` is a plain attribute: it never
    changes the function nor the state_dict keys.  With BatchNorm in eval mode (the default: base weights
    and statistics frozen) the block runs the parts of its layout; with BatchNorm in train mode (BN
    adaptation) it runs the train-time form over the kept branches so that the statistics update.
    """

    def __init__(self, spec):
        # type: (BlockSpec) -> None
        super(HyperRepVGGBlock, self).__init__(spec)
        self.alpha = nn.Parameter(torch.ones(3))
        self.register_buffer('kept', torch.tensor([True, True, spec.has_identity]))
        self.layout = parallel_layout(self.kept_set())

    def kept_set(self):
        # type: () -> frozenset
        return frozenset(b for b, k in zip(BRANCHES, self.kept.tolist()) if k)

    def available(self):
        # type: () -> Tuple[str, ...]
        """Branches this block has at all (no identity when in != out or stride 2)."""
        return BRANCHES if self.spec.has_identity else ('D', 'O')

    def forward(self, x):
        if self.rbr_dense.bn.training:
            out = None
            for b in sorted(self.kept_set(), key=BRANCHES.index):
                y = self.alpha[BRANCHES.index(b)] * self.branch_output(b, x)
                out = y if out is None else out + y
        else:
            out = None
            for part in LAYOUTS[self.layout].parts:
                weight, bias = part_tensors(self, part, self.alpha)
                y = run_part(part_kind(part), weight, bias, x, self.spec.stride, self.spec.groups)
                out = y if out is None else out + y
        return self.nonlinearity(out)


class DeployedBlock(nn.Module):
    """Inference-only form of a block for one layout: the parts' kernels are precomputed buffers.

    This is what the edge device and the LUT measurement run; `deploy_block` builds it.
    """

    def __init__(self, spec, layout, tensors):
        # type: (BlockSpec, int, Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None
        super(DeployedBlock, self).__init__()
        self.spec = spec
        self.layout = layout
        self.kinds = [part_kind(p) for p in LAYOUTS[layout].parts]
        for i, (w, b) in enumerate(tensors):
            self.register_buffer('w{}'.format(i), w.detach().clone())
            self.register_buffer('b{}'.format(i), b.detach().clone())

    def forward(self, x):
        out = None
        for i, kind in enumerate(self.kinds):
            y = run_part(kind, getattr(self, 'w{}'.format(i)), getattr(self, 'b{}'.format(i)), x,
                         self.spec.stride, self.spec.groups)
            out = y if out is None else out + y
        return F.relu(out)


def deploy_block(block, layout=None, kept=None):
    # type: (RepVGGBlock, Optional[int], Optional[Sequence[str]]) -> DeployedBlock
    """Precompute the kernels of `block` for `layout` with the kept branches `kept`; the block is not changed.

    `kept` defaults to the block's own kept set (every branch it has for a plain RepVGGBlock); `layout` to the
    block's own layout when `kept` is not given, else (and for a plain block) the fused layout of the kept set.
    The one place a block is deployed: the LUT (any layout), the sensitivities (a block with one branch pruned),
    the edge and the part files all come through here.
    """
    if getattr(block.spec, 'plain', False):  # a plain network's block (chain_nets): one layout, 0, deployed as is
        if (layout is not None and int(layout) != 0) or (kept is not None and frozenset(kept) != LAYOUTS[0].branches):
            raise ValueError('block {} ({}) of a plain network has only layout 0 (branch D), got layout {} kept {}'
                             .format(block.spec.index, block.spec.name, layout, kept))
        out = copy.deepcopy(block).eval()
        out.layout = 0
        return out
    has = frozenset(BRANCHES if block.spec.has_identity else ('D', 'O'))
    own = block.kept_set() if isinstance(block, HyperRepVGGBlock) else has
    if layout is None:
        layout = getattr(block, 'layout', None) if kept is None else None
    kept = own if kept is None else frozenset(kept)
    if not kept or not kept <= has:
        raise ValueError('block {} ({}): kept branches must be a non-empty subset of {}, got {}'.format(
            block.spec.index, block.spec.name, ''.join(sorted(has, key=BRANCHES.index)),
            ''.join(sorted(kept, key=BRANCHES.index))))
    layout = fused_layout(kept) if layout is None else int(layout)
    if LAYOUTS[layout].branches != kept:
        raise ValueError('layout {} is not valid for block {} ({}) with kept branches {}'.format(
            layout, block.spec.index, block.spec.name, ''.join(sorted(kept, key=BRANCHES.index))))
    alpha = getattr(block, 'alpha', None)
    with torch.no_grad():
        tensors = [part_tensors(block, part, alpha) for part in LAYOUTS[layout].parts]
    return DeployedBlock(block.spec, layout, tensors)


class RepVGG(nn.Module):
    """Train-time RepVGG with the official module names (stage0, stage1.0, ..., linear)."""

    block_class = RepVGGBlock

    def __init__(self, name, num_classes=1000, width_multiplier=None, small_input=False):
        # type: (str, int, Optional[Sequence[float]], bool) -> None
        super(RepVGG, self).__init__()
        self.arch = arch_name(name)
        self.num_classes = num_classes
        self.width_multiplier = None if width_multiplier is None else tuple(float(w) for w in width_multiplier)
        self.small_input = bool(small_input)
        self.plan = block_plan(self.arch, width_multiplier, small_input)
        make = self.block_class
        self.stage0 = make(self.plan[0])
        for stage in range(1, 5):
            prefix = 'stage{}.'.format(stage)
            setattr(self, 'stage{}'.format(stage),
                    nn.ModuleList([make(s) for s in self.plan if s.name.startswith(prefix)]))
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(self.plan[-1].out_channels, num_classes)

    @property
    def num_blocks(self):
        # type: () -> int
        return len(self.plan)

    @property
    def blocks(self):
        # type: () -> List[RepVGGBlock]
        """Blocks in forward order; blocks[0] is stage0."""
        out = [self.stage0]
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4):
            out.extend(stage)
        return out

    def spec_dict(self):
        # type: () -> Dict[str, object]
        """JSON-able constructor arguments: enough to rebuild the same architecture anywhere."""
        return {'name': self.arch, 'num_classes': self.num_classes,
                'width_multiplier': None if self.width_multiplier is None else list(self.width_multiplier),
                'small_input': self.small_input}

    def forward_head(self, h):
        # type: (torch.Tensor) -> torch.Tensor
        return self.linear(torch.flatten(self.gap(h), 1))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.forward_head(x)


def build_repvgg(name, num_classes=1000, width_multiplier=None, small_input=False):
    # type: (str, int, Optional[Sequence[float]], bool) -> RepVGG
    """The train-time RepVGG `name` (A0..B3g4); state_dict keys are those of the official checkpoints."""
    return RepVGG(name, num_classes, width_multiplier, small_input)


def checkpoint_filter_fn(state_dict):
    # type: (Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]
    """Map an official-layout checkpoint to our keys: unwrap {'model'|'state_dict': ...}, drop 'module.'."""
    for wrapper in ('model', 'state_dict'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state_dict.items()}


HYPER_KEYS = ('alpha', 'kept')  # per-block state a HyperRepVGG adds to the official keys


class HyperRepVGG(RepVGG):
    """RepVGG with frozen base weights and per-block hyper-weights, pruning masks, layouts and a split."""

    block_class = HyperRepVGGBlock

    def __init__(self, name, num_classes=1000, width_multiplier=None, small_input=False, adapt_bn=False):
        # type: (str, int, Optional[Sequence[float]], bool, bool) -> None
        super(HyperRepVGG, self).__init__(name, num_classes, width_multiplier, small_input)
        self.adapt_bn = bool(adapt_bn)
        for pname, p in self.named_parameters():
            p.requires_grad_(pname.rsplit('.', 1)[-1] == 'alpha')
        self.train(False)

    def train(self, mode=True):
        """Train mode for alpha; BatchNorm stays in eval (frozen statistics) unless `adapt_bn`."""
        super(HyperRepVGG, self).train(mode)
        if not self.adapt_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def _block(self, k):
        # type: (int) -> HyperRepVGGBlock
        if not 0 <= k < self.num_blocks:
            raise IndexError('block {} out of range 0..{}'.format(k, self.num_blocks - 1))
        return self.blocks[k]

    def alpha_parameters(self):
        # type: () -> List[nn.Parameter]
        return [b.alpha for b in self.blocks]

    def kept(self, k):
        # type: (int) -> frozenset
        return self._block(k).kept_set()

    def prune(self, k, branch):
        # type: (int, str) -> None
        """Remove `branch` ('D', 'O' or 'I') from block k; the layout falls back to the parallel one if needed."""
        block = self._block(k)
        if branch not in block.available():
            raise ValueError('block {} ({}) has no branch {!r}; it has {}'.format(
                k, block.spec.name, branch, ', '.join(block.available())))
        kept = block.kept_set()
        if branch in kept and len(kept) == 1:
            raise ValueError('block {} ({}): cannot prune {!r}, a block keeps at least one branch'.format(
                k, block.spec.name, branch))
        block.kept[BRANCHES.index(branch)] = False
        if block.layout not in layouts_for(block.kept_set()):
            block.layout = parallel_layout(block.kept_set())

    def set_kept(self, k, branches):
        # type: (int, Sequence[str]) -> None
        """Set block k's kept branches (restoring pruned ones is allowed); at least one must remain."""
        block = self._block(k)
        branches = frozenset(branches)
        bad = branches - frozenset(block.available())
        if not branches or bad:
            raise ValueError('block {} ({}): kept branches must be a non-empty subset of {}, got {}'.format(
                k, block.spec.name, ''.join(block.available()), ''.join(sorted(branches, key=BRANCHES.index))))
        for i, b in enumerate(BRANCHES):
            block.kept[i] = b in branches
        if block.layout not in layouts_for(branches):
            block.layout = parallel_layout(branches)

    def valid_layouts(self, k):
        # type: (int) -> List[int]
        return layouts_for(self.kept(k))

    def set_layout(self, k, gamma):
        # type: (int, int) -> None
        block = self._block(k)
        if gamma not in layouts_for(block.kept_set()):
            raise ValueError('layout gamma={} is not valid for block {} ({}) with kept branches {}; valid: {}'.format(
                gamma, k, block.spec.name, ''.join(sorted(block.kept_set(), key=BRANCHES.index)),
                layouts_for(block.kept_set())))
        block.layout = int(gamma)

    def layouts(self):
        # type: () -> List[int]
        return [b.layout for b in self.blocks]

    def hyper_weights(self):
        # type: () -> Dict[str, object]
        """JSON-able per-domain state: per block alpha (only branches the block has), kept, layout."""
        out = []
        for b in self.blocks:
            alpha = b.alpha.detach().cpu().tolist()
            out.append({'block': b.spec.index, 'name': b.spec.name,
                        'alpha': {br: float(alpha[i]) for i, br in enumerate(BRANCHES) if br in b.available()},
                        'kept': [br for br in BRANCHES if br in b.kept_set()],
                        'layout': b.layout})
        return {'arch': self.spec_dict(), 'blocks': out}

    def load_hyper_weights(self, d):
        # type: (Dict[str, object]) -> None
        """Inverse of hyper_weights(); checks the block count and names before changing anything."""
        blocks = d.get('blocks') if isinstance(d, dict) else None
        if not isinstance(blocks, list) or len(blocks) != self.num_blocks:
            raise ValueError('hyper-weights: field "blocks" must list {} blocks for {}, got {}'.format(
                self.num_blocks, self.arch, len(blocks) if isinstance(blocks, list) else type(blocks).__name__))
        for k, (entry, block) in enumerate(zip(blocks, self.blocks)):
            if entry.get('name') != block.spec.name:
                raise ValueError('hyper-weights: blocks[{}].name is {!r}, expected {!r}'.format(
                    k, entry.get('name'), block.spec.name))
            extra = set(entry['alpha']) - set(block.available())
            if extra:
                raise ValueError('hyper-weights: blocks[{}].alpha has branches {} that block {} lacks'.format(
                    k, sorted(extra), block.spec.name))
        with torch.no_grad():
            for entry, block in zip(blocks, self.blocks):
                for br, v in entry['alpha'].items():
                    block.alpha[BRANCHES.index(br)] = float(v)
                self.set_kept(block.spec.index, entry.get('kept', block.available()))
                if 'layout' in entry:
                    self.set_layout(block.spec.index, int(entry['layout']))

    def load_base_state_dict(self, state_dict):
        # type: (Dict[str, torch.Tensor]) -> None
        """Load train-time RepVGG weights (official layout) strictly; alpha and kept are left as they are."""
        state_dict = checkpoint_filter_fn(state_dict)
        own = self.state_dict()
        base_keys = {k for k in own if k.rsplit('.', 1)[-1] not in HYPER_KEYS}
        missing, unexpected = sorted(base_keys - set(state_dict)), sorted(set(state_dict) - base_keys)
        if missing or unexpected:
            raise KeyError('checkpoint does not match {} ({} classes): missing {} unexpected {}'.format(
                self.arch, self.num_classes, missing[:5], unexpected[:5]))
        merged = dict(state_dict)
        merged.update({k: v for k, v in own.items() if k not in base_keys})
        self.load_state_dict(merged, strict=True)

    def split(self, lam):
        # type: (int) -> Tuple[SplitPart, SplitPart]
        """(edge, server): the edge runs blocks [0, lam), the server [lam, N) + pooling + classifier."""
        if not 0 <= lam <= self.num_blocks:
            raise ValueError('split lambda={} out of range 0..{}'.format(lam, self.num_blocks))
        blocks = self.blocks
        return SplitPart(blocks[:lam], None), SplitPart(blocks[lam:], (self.gap, self.linear))

    def edge_state_dict(self, lam):
        # type: (int) -> Dict[str, torch.Tensor]
        """Official-named tensors of blocks [0, lam) only (base weights, alpha, kept): what the edge needs."""
        names = tuple(s.name + '.' for s in self.plan[:lam])
        return {k: v for k, v in self.state_dict().items() if k.startswith(names)}


class SplitPart(nn.Module):
    """A contiguous run of blocks, optionally followed by the head (global pooling + classifier)."""

    def __init__(self, blocks, head=None):
        # type: (Sequence[nn.Module], Optional[Tuple[nn.Module, nn.Module]]) -> None
        super(SplitPart, self).__init__()
        self.blocks = nn.ModuleList(list(blocks))
        self.block_ids = [b.spec.index for b in blocks]
        self.has_head = head is not None
        if head is not None:
            self.gap, self.linear = head

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if self.has_head:
            x = self.linear(torch.flatten(self.gap(x), 1))
        return x


def build_hyper_repvgg(name, checkpoint=None, num_classes=1000, width_multiplier=None, small_input=False,
                       adapt_bn=False):
    # type: (str, Optional[Dict[str, torch.Tensor]], int, Optional[Sequence[float]], bool, bool) -> HyperRepVGG
    """HyperRepVGG `name` with frozen base weights (from `checkpoint`, a state dict, if given), alpha = 1."""
    model = HyperRepVGG(name, num_classes, width_multiplier, small_input, adapt_bn)
    if checkpoint is not None:
        model.load_base_state_dict(checkpoint)
    return model


def apply_config(model, gammas):
    # type: (HyperRepVGG, Sequence[int]) -> None
    """Apply a configuration in place: block k keeps the branches of layout gammas[k] (restoring earlier prunes where
    that set grows) and runs layout gammas[k].  Validates every block before changing any.  A plain network
    (chain_nets.ChainNet) has one layout per block: its configuration is only checked."""
    if getattr(model, 'plain', False):
        model.check_config(gammas)
        return
    if len(gammas) != model.num_blocks:
        raise ValueError('need {} layouts, got {}'.format(model.num_blocks, len(gammas)))
    for k, (g, block) in enumerate(zip(gammas, model.blocks)):
        if not 0 <= int(g) < NUM_LAYOUTS or not LAYOUTS[int(g)].branches <= frozenset(block.available()):
            raise ValueError('layout gamma={} is not valid for block {} ({}), which has branches {}'.format(
                g, k, block.spec.name, ''.join(block.available())))
    for k, g in enumerate(gammas):
        model.set_kept(k, LAYOUTS[int(g)].branches)
        model.set_layout(k, int(g))


def apply_layouts(model, gammas, inplace=False):
    # type: (HyperRepVGG, Sequence[int], bool) -> HyperRepVGG
    """Set every block's layout, keeping its kept branches (a copy unless inplace); validates all before changing
    any."""
    if len(gammas) != model.num_blocks:
        raise ValueError('need {} layouts, got {}'.format(model.num_blocks, len(gammas)))
    for k, g in enumerate(gammas):
        if g not in model.valid_layouts(k):
            raise ValueError('layout gamma={} is not valid for block {}; valid: {}'.format(g, k, model.valid_layouts(k)))
    out = model if inplace else copy.deepcopy(model)
    apply_config(out, gammas)
    return out


def deploy_part(part):
    # type: (SplitPart) -> SplitPart
    """Inference copy of a split part with every block's kernels precomputed for its current layout."""
    head = (copy.deepcopy(part.gap), copy.deepcopy(part.linear)) if part.has_head else None
    return SplitPart([deploy_block(b) for b in part.blocks], head).eval()


def build_edge(arch, lam, state_dict, layouts):
    # type: (Dict[str, object], int, Dict[str, torch.Tensor], Sequence[int]) -> SplitPart
    """Rebuild a deployed edge part on the device from its spec, the edge tensors and the layouts.

    Only blocks [0, lam) are allocated.  `state_dict` must hold exactly edge_state_dict(lam)'s keys.
    """
    plan = block_plan(arch['name'], arch.get('width_multiplier'), bool(arch.get('small_input', False)))
    if not 0 <= lam <= len(plan) or len(layouts) != lam:
        raise ValueError('edge split lambda={} needs {} layouts, got {}'.format(lam, lam, len(layouts)))
    blocks = []
    for spec, gamma in zip(plan[:lam], layouts):
        block = HyperRepVGGBlock(spec)
        prefix = spec.name + '.'
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        block.load_state_dict(sub, strict=True)
        blocks.append(deploy_block(block.eval(), int(gamma)))  # checks gamma against the sent kept set
    unknown = [k for k in state_dict if not k.startswith(tuple(s.name + '.' for s in plan[:lam]))]
    if unknown:
        raise ValueError('edge tensors include keys beyond block {}: {}'.format(lam - 1, unknown[:5]))
    return SplitPart(blocks, None).eval()


def deploy_param_count(model):
    # type: (RepVGG) -> int
    """Parameters of the plain deploy form (every block one fused 3x3 conv with bias, plus the classifier)."""
    total = sum(p.numel() for p in model.linear.parameters())
    for s in model.plan:
        total += s.out_channels * (s.in_channels // s.groups) * 9 + s.out_channels
    return total
