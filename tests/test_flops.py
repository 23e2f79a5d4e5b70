"""Closed-form counts of timing/flops.py: shapes, MACs, bytes per layout, link bytes; cross-checked with fvcore."""
import pytest
import torch

from hyper_repvgg import LAYOUTS, BlockSpec, HyperRepVGGBlock, block_plan
from timing import flops as F
from timing.measure import deployed_layout, randomize_bn_

BLOCK = BlockSpec(5, 'stage2.1', 16, 16, 1, 1)  # identity block, 8x8 input in the tests below
DOWN = BlockSpec(1, 'stage1.0', 8, 16, 2, 1)  # stride-2 block: no identity branch


def test_block_input_hw_follows_strides():
    plan = block_plan('A0')
    hw = F.block_input_hw(plan, 224)
    assert hw[0] == (224, 224) and hw[1] == (112, 112) and hw[2] == (56, 56) and hw[3] == (56, 56)
    assert hw[-1] == (14, 14)  # stage4 input; stage4 itself outputs 7x7
    assert F.out_hw(plan[-1], hw[-1]) == (7, 7)
    small = F.block_input_hw(block_plan('A0', small_input=True), 32)
    assert small[1] == (32, 32) and small[2] == (16, 16)
    assert F.block_input_hw(plan, 33)[1] == (17, 17)  # odd sizes round up like the padded convs


def test_branch_macs_closed_form_and_groups():
    assert F.branch_macs(BLOCK, (8, 8)) == {'D': 16 * 16 * 9 * 64, 'O': 16 * 16 * 64, 'I': 16 * 64}
    assert F.branch_macs(DOWN, (8, 8)) == {'D': 16 * 8 * 9 * 16, 'O': 16 * 8 * 16}
    g2 = BlockSpec(2, 'stage1.1', 16, 16, 1, 2)
    assert F.branch_macs(g2, (8, 8))['D'] == 16 * 8 * 9 * 64


def test_layout_bytes_for_a_known_block():
    fused = F.layout_cost(BLOCK, (8, 8), 13)
    act = 16 * 8 * 8 * 4
    assert fused.macs == 16 * 16 * 9 * 64 and fused.flops == 2 * fused.macs
    assert fused.weight_bytes == (16 * 16 * 9 + 16) * 4
    assert (fused.act_in_bytes, fused.act_out_bytes, fused.kernels) == (act, act, 2)
    assert fused.intensity_flop_per_byte == pytest.approx(fused.flops / (fused.weight_bytes + 2 * act))
    par = F.layout_cost(BLOCK, (8, 8), 9)  # D, O, I each a kernel, two summations
    assert par.macs == 16 * 16 * 9 * 64 + 16 * 16 * 64 + 16 * 64
    assert par.weight_bytes == ((16 * 16 * 9 + 16) + (16 * 16 + 16) + 2 * 16) * 4
    assert par.act_in_bytes == 3 * act and par.act_out_bytes == (3 + 6) * act and par.kernels == 6
    one_by_one = F.layout_cost(BLOCK, (8, 8), 8)  # O+I fused into one 1x1
    assert one_by_one.macs == 16 * 16 * 64 and one_by_one.weight_bytes == (16 * 16 + 16) * 4
    fp16 = F.layout_cost(BLOCK, (8, 8), 13, act_bytes_per_elem=2)
    assert fp16.act_in_bytes == act // 2 and fp16.weight_bytes == fused.weight_bytes


def test_layouts_without_identity_are_not_measurable():
    assert F.measurable_layouts(DOWN) == [0, 1, 3, 4]
    assert F.measurable_layouts(BLOCK) == list(range(14))
    for g in (2, 5, 9, 13):
        with pytest.raises(ValueError, match='has only DO'):
            F.layout_cost(DOWN, (8, 8), g)
    with pytest.raises(ValueError, match='0..13'):
        F.layout_cost(BLOCK, (8, 8), 14)


def test_link_bytes_per_split():
    plan = block_plan('A0', (0.25, 0.25, 0.25, 0.25))
    lb = F.link_bytes(plan, 32, 10, 'fp32')
    shapes = F.block_shapes(plan, 32)
    assert len(lb) == len(plan) + 1
    assert lb[0] == 3 * 32 * 32 and lb[-1] == 10 * 4
    c, h, w = shapes[4]['output_shape']
    assert lb[5] == c * h * w * 4
    half = F.link_bytes(plan, 32, 10, 'fp16')
    assert half[0] == lb[0] and half[-1] == lb[-1] and half[5] == lb[5] // 2
    with pytest.raises(ValueError, match='fp32'):
        F.link_bytes(plan, 32, 10, 'int4')


@pytest.mark.parametrize('gamma', [0, 1, 4, 8, 13])
def test_conv_macs_match_fvcore(gamma):
    """fvcore counts one flop per multiply-add of a convolution: it must equal our MACs for conv-only layouts."""
    fvcore = pytest.importorskip('fvcore.nn')
    block = HyperRepVGGBlock(BLOCK)
    randomize_bn_(block, torch.Generator().manual_seed(0))
    deployed = deployed_layout(block.eval(), gamma)
    x = torch.randn(1, 16, 8, 8)
    counter = fvcore.FlopCountAnalysis(deployed, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert counter.total() == F.layout_cost(BLOCK, (8, 8), gamma).macs
    assert len(LAYOUTS[gamma].parts) == 1
