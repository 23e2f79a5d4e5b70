"""Closed-form operation and byte counts of RepVGG blocks, layouts, plain-network blocks, the head and the split
points.

Pure Python over `hyper_repvgg.BlockSpec` tuples (no torch): importable on the device (Python 3.6).

Conventions (docs/design.md#flops-and-bytes):
  * a block's spatial output is ((H - 1) // stride + 1) for both the 3x3 (pad 1) and the 1x1 (pad 0) conv;
  * MACs of a conv part: out_ch * (in_ch / groups) * k * k * Ho * Wo; of the identity (affine) part: C * Ho * Wo;
    FLOPs = 2 * MACs (the summation of parallel parts and the ReLU are not counted as FLOPs);
  * a layout gamma (hyper_repvgg.LAYOUTS) runs one kernel per part: a fused part costs one kernel of its kind
    (3x3 if it holds D, else 1x1 if it holds O, else the per-channel affine);
  * weight bytes: the precomputed kernels and biases of the parts (what the deployed block stores);
  * activation bytes: every part's kernel reads the input and writes an output; every extra part's
    summation reads two outputs and writes one; the final ReLU is fused into the last kernel's pass and not
    counted.  A one-part layout therefore moves exactly input + output;
  * kernels launched: one per part, one per summation, one for the ReLU (what a per-kernel overhead model counts);
  * arithmetic intensity = FLOPs / (weight + activation bytes), weights included (docs/design.md#roofline-tie-breaker).
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple  # noqa: F401 - used in type comments

from hyper_repvgg import BRANCHES, LAYOUTS, part_kind

DTYPE_BYTES = {'fp32': 4, 'fp16': 2, 'uint8': 1}
_KERNEL_SIZE = {'conv3': 3, 'conv1': 1}


def dtype_bytes(name):
    # type: (str) -> int
    """Bytes per element of 'fp32' | 'fp16' | 'uint8'."""
    if name not in DTYPE_BYTES:
        raise ValueError('unknown dtype {!r}; valid choices: {}'.format(name, ', '.join(sorted(DTYPE_BYTES))))
    return DTYPE_BYTES[name]


def out_hw(spec, in_hw):
    # type: (object, Tuple[int, int]) -> Tuple[int, int]
    """Spatial output size of block `spec` for an input of in_hw = (h, w)."""
    h, w = in_hw
    return (h - 1) // spec.stride + 1, (w - 1) // spec.stride + 1


def block_input_hw(plan, input_size):
    # type: (Sequence[object], int) -> List[Tuple[int, int]]
    """Input spatial size (h, w) of every block of `plan` (hyper_repvgg.block_plan) for a square input."""
    if int(input_size) < 1:
        raise ValueError('input_size must be a positive number of pixels, got {!r}'.format(input_size))
    hw = (int(input_size), int(input_size))
    out = []
    for spec in plan:
        out.append(hw)
        hw = out_hw(spec, hw)
    return out


def block_shapes(plan, input_size):
    # type: (Sequence[object], int) -> List[Dict[str, object]]
    """Per block: index, name, channels, stride, groups, input and output shape (C, H, W) of one sample."""
    rows = []
    for spec, hw in zip(plan, block_input_hw(plan, input_size)):
        ho, wo = out_hw(spec, hw)
        rows.append({'block': spec.index, 'name': spec.name, 'in_channels': spec.in_channels,
                     'out_channels': spec.out_channels, 'stride': spec.stride, 'groups': spec.groups,
                     'has_identity': bool(spec.has_identity),
                     'input_shape': [spec.in_channels, hw[0], hw[1]], 'output_shape': [spec.out_channels, ho, wo]})
    return rows


def available_branches(spec):
    # type: (object) -> Tuple[str, ...]
    """Branches block `spec` has at all: D and O always, I only when in == out channels and stride 1; a plain
    network's block (chain_nets) has one, D: the block itself."""
    if getattr(spec, 'plain', False):
        return ('D',)
    return BRANCHES if spec.has_identity else ('D', 'O')


def measurable_layouts(spec):
    # type: (object) -> List[int]
    """Layouts whose branch set is a subset of the block's branches (without identity: 0, 1, 3, 4)."""
    have = frozenset(available_branches(spec))
    return [lay.gamma for lay in LAYOUTS if lay.branches <= have]


def _kernel_macs(spec, kind, ho, wo):
    # type: (object, str, int, int) -> int
    if kind == 'affine':
        return spec.in_channels * ho * wo
    k = _KERNEL_SIZE[kind]
    return spec.out_channels * (spec.in_channels // spec.groups) * k * k * ho * wo


def _kernel_params(spec, kind):
    # type: (object, str) -> int
    """Stored elements of one deployed part: kernel + bias (affine: scale + shift)."""
    if kind == 'affine':
        return 2 * spec.in_channels
    k = _KERNEL_SIZE[kind]
    return spec.out_channels * (spec.in_channels // spec.groups) * k * k + spec.out_channels


def branch_macs(spec, in_hw):
    # type: (object, Tuple[int, int]) -> Dict[str, int]
    """Multiply-adds of each branch the block has, for one sample: {'D': ..., 'O': ..., ['I': ...]}."""
    ho, wo = out_hw(spec, in_hw)
    if getattr(spec, 'plain', False):
        return {'D': plain_cost(spec, in_hw).macs}
    kinds = {'D': 'conv3', 'O': 'conv1', 'I': 'affine'}
    return {b: _kernel_macs(spec, kinds[b], ho, wo) for b in available_branches(spec)}


class LayoutCost(NamedTuple):
    macs: int  # multiply-adds of one sample
    flops: int  # 2 * macs
    weight_bytes: int  # precomputed kernels + biases of the layout's parts
    act_in_bytes: int  # input activation bytes read (every part reads the input), one sample
    act_out_bytes: int  # output activation bytes written/read (parts' outputs + summations), one sample
    kernels: int  # kernels launched: parts + summations + ReLU
    intensity_flop_per_byte: float  # flops / (weight + act_in + act_out bytes)

    @property
    def bytes(self):
        # type: () -> int
        return self.weight_bytes + self.act_in_bytes + self.act_out_bytes

    @property
    def act_bytes(self):
        # type: () -> int
        return self.act_in_bytes + self.act_out_bytes


def layout_cost(spec, in_hw, gamma, act_bytes_per_elem=4, weight_bytes_per_elem=4):
    # type: (object, Tuple[int, int], int, int, int) -> LayoutCost
    """Cost of running block `spec` with layout `gamma` on one sample of spatial size in_hw.

    Raises ValueError when gamma uses a branch the block does not have (e.g. identity with stride 2).
    """
    if not 0 <= int(gamma) < len(LAYOUTS):
        raise ValueError('layout gamma must be in 0..{}, got {!r}'.format(len(LAYOUTS) - 1, gamma))
    layout = LAYOUTS[int(gamma)]
    if not layout.branches <= frozenset(available_branches(spec)):
        raise ValueError('layout {} needs branches {} but block {} ({}) has only {}'.format(
            gamma, ''.join(sorted(layout.branches, key=BRANCHES.index)), spec.index, spec.name,
            ''.join(available_branches(spec))))
    if getattr(spec, 'plain', False):
        return plain_cost(spec, in_hw, act_bytes_per_elem, weight_bytes_per_elem)
    ho, wo = out_hw(spec, in_hw)
    macs = params = 0
    for part in layout.parts:
        kind = part_kind(part)
        macs += _kernel_macs(spec, kind, ho, wo)
        params += _kernel_params(spec, kind)
    parts = len(layout.parts)
    in_elems = spec.in_channels * in_hw[0] * in_hw[1]
    out_elems = spec.out_channels * ho * wo
    act_in = parts * in_elems * act_bytes_per_elem
    act_out = (parts + 3 * (parts - 1)) * out_elems * act_bytes_per_elem
    weight = params * weight_bytes_per_elem
    flops = 2 * macs
    return LayoutCost(macs, flops, weight, act_in, act_out, 2 * parts, float(flops) / (weight + act_in + act_out))


def _convs(spec, in_hw):
    # type: (object, Tuple[int, int]) -> List[Tuple[int, int, int, int, int, Tuple[int, int], Tuple[int, int]]]
    """The convolutions of a plain block in order: (in_ch, out_ch, k, groups, stride, in_hw, out_hw); each is
    followed by its BatchNorm (folded into it in the deploy form)."""
    s = spec
    h1 = out_hw(s, in_hw)
    if s.kind == 'conv_bn_act':
        return [(s.in_channels, s.out_channels, s.kernel, 1, s.stride, in_hw, h1)]
    if s.kind == 'stem':  # 7x7 stride-2 conv, then a 3x3 stride-2 max pool (not a conv; see plain_cost)
        mid = ((in_hw[0] - 1) // 2 + 1, (in_hw[1] - 1) // 2 + 1)
        return [(s.in_channels, s.out_channels, 7, 1, 2, in_hw, mid)]
    if s.kind == 'inverted_residual':
        out = [(s.in_channels, s.hidden, 1, 1, 1, in_hw, in_hw)] if s.hidden != s.in_channels else []
        return out + [(s.hidden, s.hidden, 3, s.hidden, s.stride, in_hw, h1),
                      (s.hidden, s.out_channels, 1, 1, 1, h1, h1)]
    short = [(s.in_channels, s.out_channels, 1, 1, s.stride, in_hw, h1)] if s.shortcut else []
    if s.kind == 'basic':
        return [(s.in_channels, s.out_channels, 3, 1, s.stride, in_hw, h1),
                (s.out_channels, s.out_channels, 3, 1, 1, h1, h1)] + short
    if s.kind == 'bottleneck':
        return [(s.in_channels, s.hidden, 1, 1, 1, in_hw, in_hw), (s.hidden, s.hidden, 3, 1, s.stride, in_hw, h1),
                (s.hidden, s.out_channels, 1, 1, 1, h1, h1)] + short
    raise ValueError('unknown plain block kind {!r} of block {} ({})'.format(s.kind, s.index, s.name))


def plain_cost(spec, in_hw, act_bytes_per_elem=4, weight_bytes_per_elem=4):
    # type: (object, Tuple[int, int], int, int) -> LayoutCost
    """Cost of a plain network's block (chain_nets.ChainBlockSpec; its one layout) on one sample, as deployed with
    BN folded: MACs of every conv (depthwise: out_ch x k x k x Ho x Wo), weights = kernels + biases, activations =
    every conv reads its input and writes its output; a residual sum reads two tensors and writes one; the stem's
    max pool reads the conv output and writes the block output.  Kernels: one per conv, one per sum or pool."""
    macs = params = act = 0
    kernels = 0
    for c_in, c_out, k, groups, _, hw_in, hw_out in _convs(spec, in_hw):
        macs += c_out * (c_in // groups) * k * k * hw_out[0] * hw_out[1]
        params += c_out * (c_in // groups) * k * k + c_out
        act += c_in * hw_in[0] * hw_in[1] + c_out * hw_out[0] * hw_out[1]
        kernels += 1
    ho, wo = out_hw(spec, in_hw)
    out_elems = spec.out_channels * ho * wo
    if spec.kind == 'stem':
        mid = ((in_hw[0] - 1) // 2 + 1, (in_hw[1] - 1) // 2 + 1)
        act += spec.out_channels * mid[0] * mid[1] + out_elems
        kernels += 1
    elif spec.kind in ('basic', 'bottleneck') or spec.shortcut:
        act += 3 * out_elems
        kernels += 1
    in_elems = spec.in_channels * in_hw[0] * in_hw[1]
    act_in = in_elems * act_bytes_per_elem
    act_out = act * act_bytes_per_elem - act_in
    weight = params * weight_bytes_per_elem
    flops = 2 * macs
    return LayoutCost(macs, flops, weight, act_in, act_out, kernels, float(flops) / (weight + act_in + act_out))


def head_cost(plan, input_size, num_classes, act_bytes_per_elem=4, weight_bytes_per_elem=4):
    # type: (Sequence[object], int, int, int, int) -> LayoutCost
    """Global average pooling + linear classifier after the last block, one sample."""
    last = plan[-1]
    h, w = out_hw(last, block_input_hw(plan, input_size)[-1])
    c = last.out_channels
    macs = c * h * w + c * num_classes
    weight = (c * num_classes + num_classes) * weight_bytes_per_elem
    act_in = (c * h * w + c) * act_bytes_per_elem
    act_out = (c + num_classes) * act_bytes_per_elem
    return LayoutCost(macs, 2 * macs, weight, act_in, act_out, 2, float(2 * macs) / (weight + act_in + act_out))


def link_bytes(plan, input_size, num_classes, feature_dtype='fp32'):
    # type: (Sequence[object], int, int, Optional[str]) -> List[int]
    """Bytes of one sample crossing the link at each split lambda = 0..N.

    lambda = 0: the uint8 3 x H x W image; 0 < lambda < N: block lambda-1's output in `feature_dtype`;
    lambda = N: the fp32 logits.
    """
    per = dtype_bytes(feature_dtype or 'fp32')
    shapes = block_shapes(plan, input_size)
    out = [3 * int(input_size) * int(input_size) * DTYPE_BYTES['uint8']]
    for row in shapes[:-1]:
        c, h, w = row['output_shape']
        out.append(c * h * w * per)
    out.append(int(num_classes) * DTYPE_BYTES['fp32'])
    return out
