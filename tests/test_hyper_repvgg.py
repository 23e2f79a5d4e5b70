"""HyperRepVGG: architecture table, official keys, the 14 layouts, pruning, gradients and the split."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hyper_repvgg as H

TINY = dict(num_classes=10, width_multiplier=(0.25, 0.25, 0.25, 0.25))


def randomize_bn(model, gen):
    """Random BN statistics and affine parameters, as RepVGG's verify.py does, so folding is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


def reference_block(block, x):
    """Train-time form with eval-mode BN: ReLU(sum over kept branches of alpha_b * branch_b(x))."""
    out = 0
    for i, b in enumerate(H.BRANCHES):
        if b in block.kept_set():
            out = out + block.alpha[i] * block.branch_output(b, x)
    return F.relu(out)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ------------------------------------------------------------------ architecture table and official keys
@pytest.mark.parametrize('name', sorted(H.ARCHS))
def test_arch_table_block_count_and_official_keys(name):
    plan = H.block_plan(name)
    assert len(plan) == (22 if '-A' in name else 28)
    keys = set(H.build_repvgg(name, num_classes=10, width_multiplier=(0.125,) * 4).state_dict())
    for k in ('stage0.rbr_dense.conv.weight', 'stage0.rbr_1x1.bn.running_mean', 'stage1.0.rbr_dense.bn.weight',
              'stage1.1.rbr_identity.weight', 'stage1.1.rbr_identity.running_var', 'stage4.0.rbr_1x1.conv.weight',
              'linear.weight', 'linear.bias'):
        assert k in keys, k
    assert 'stage1.0.rbr_identity.weight' not in keys  # stride-2 blocks have no identity branch
    assert not any(k.endswith(('alpha', 'kept')) for k in keys)


def test_grouped_variants_group_even_blocks():
    plan = H.block_plan('B1g4')
    assert [s.groups for s in plan[:6]] == [1, 1, 4, 1, 4, 1]
    assert all(s.groups == 1 for s in H.block_plan('B1'))


def test_unknown_arch_names_the_choices():
    with pytest.raises(KeyError, match='RepVGG-A0'):
        H.build_repvgg('RepVGG-Z9')


def test_published_deploy_parameter_counts():
    assert round(H.deploy_param_count(H.build_repvgg('A0')) / 1e6, 2) == 8.31
    assert round(H.deploy_param_count(H.build_repvgg('B3')) / 1e6, 2) == 110.96


def test_deploy_param_count_matches_deployed_modules():
    m = H.build_hyper_repvgg('A0', **TINY)
    deployed = [H.deploy_block(b, H.fused_layout(b.kept_set())) for b in m.blocks]
    n = sum(t.numel() for d in deployed for t in d.buffers()) + sum(p.numel() for p in m.linear.parameters())
    assert n == H.deploy_param_count(m)


def test_state_dict_roundtrip_strict():
    a = H.build_repvgg('A0', **TINY)
    b = H.build_repvgg('A0', **TINY)
    b.load_state_dict(a.state_dict(), strict=True)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_official_checkpoint_loads_into_hyper_model_strictly():
    base = H.build_repvgg('A0', **TINY)
    randomize_bn(base, torch.Generator().manual_seed(0))
    ckpt = {'model': {'module.' + k: v for k, v in base.state_dict().items()}}  # DataParallel-style wrapper
    hyper = H.build_hyper_repvgg('A0', checkpoint=ckpt, **TINY)
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(hyper(x), base.eval()(x)) < 1e-5
    bad = dict(base.state_dict())
    bad.pop('linear.bias')
    with pytest.raises(KeyError, match='linear.bias'):
        H.build_hyper_repvgg('A0', checkpoint=bad, **TINY)


# ------------------------------------------------------------------ the 14 layouts
# (in, out, stride, groups, spatial): 4 shapes with an identity branch, 2 without
BLOCK_SHAPES = {
    'id_g1': (8, 8, 1, 1, 9), 'id_g2': (8, 8, 1, 2, 7), 'id_g4': (16, 16, 1, 4, 6), 'id_g1_wide': (12, 12, 1, 1, 5),
    'stride2': (8, 8, 2, 1, 9), 'in_ne_out': (8, 16, 1, 1, 7),
}
CASES = [(shape, g) for shape, (i, o, s, grp, _) in BLOCK_SHAPES.items() for g in range(14)
         if H.LAYOUTS[g].branches <= frozenset(H.BRANCHES if (i == o and s == 1) else ('D', 'O'))]


def make_block(shape, seed):
    i, o, s, grp, hw = BLOCK_SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    block = H.HyperRepVGGBlock(H.BlockSpec(1, 'stage1.0', i, o, s, grp))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        block.alpha.copy_(torch.rand(3, generator=gen) + 0.5)
    randomize_bn(block, gen)
    return block.eval(), torch.randn(3, i, hw, hw, generator=gen)


@pytest.mark.parametrize('shape,gamma', CASES, ids=['layout-{}-g{}'.format(s, g) for s, g in CASES])
def test_layout_equals_train_time_form(shape, gamma):
    block, x = make_block(shape, seed=gamma)
    block.kept.copy_(torch.tensor([b in H.LAYOUTS[gamma].branches for b in H.BRANCHES]))
    block.layout = gamma
    ref = reference_block(block, x)
    assert rel_err(block(x), ref) <= 1e-4
    assert rel_err(H.deploy_block(block)(x), ref) <= 1e-4


def test_deploy_under_a_kept_set_is_the_pruned_block_and_leaves_the_block_unchanged():
    """deploy_block(block, gamma, kept): the LUT (timing.measure.deployed_layout flipped the block's mask and back) and
    the sensitivities (accuracy.pruning called part_tensors itself) each had their own copy of this."""
    from timing.measure import deployed_layout
    for shape, gamma in CASES:
        block, x = make_block(shape, seed=100 + gamma)  # every branch kept, parallel layout
        kept0, layout0 = block.kept.clone(), block.layout
        pruned = copy.deepcopy(block)
        pruned.kept.copy_(torch.tensor([b in H.LAYOUTS[gamma].branches for b in H.BRANCHES]))
        pruned.layout = gamma
        for got in (H.deploy_block(block, gamma, H.LAYOUTS[gamma].branches), deployed_layout(block, gamma)):
            assert torch.equal(block.kept, kept0) and block.layout == layout0
            assert got.layout == gamma and rel_err(got(x), reference_block(pruned, x)) <= 1e-4
            for (name, a), (_, b) in zip(got.state_dict().items(), H.deploy_block(pruned).state_dict().items()):
                assert torch.equal(a, b), (shape, gamma, name)
        fused = H.deploy_block(block, kept=H.LAYOUTS[gamma].branches)
        assert fused.layout == H.fused_layout(H.LAYOUTS[gamma].branches)
    block, _ = make_block('stride2', 0)
    with pytest.raises(ValueError, match='non-empty subset of DO'):
        H.deploy_block(block, kept='DI')  # no identity branch at stride 2
    with pytest.raises(ValueError, match='layout 4 is not valid'):
        H.deploy_block(block, 4, kept='D')


def test_layout_cases_cover_all_14_layouts_on_4_shapes():
    assert len(CASES) >= 14 * 4
    assert {g for _, g in CASES} == set(range(14))


def test_identity_only_layout_is_affine_not_conv():
    block, x = make_block('id_g1', 0)
    block.kept.copy_(torch.tensor([False, False, True]))
    block.layout = 2
    assert H.deploy_block(block).kinds == ['affine']
    assert H.deploy_block(block).w0.shape == (8,)


def test_layout_validity_table():
    assert H.layouts_for('D') == [0]
    assert H.layouts_for(('D', 'O')) == [3, 4]
    assert H.layouts_for(('D', 'O', 'I')) == [9, 10, 11, 12, 13]
    assert H.parallel_layout(('D', 'O', 'I')) == 9 and H.fused_layout(('D', 'O', 'I')) == 13


def test_all_valid_layouts_agree_after_every_pruning():
    m = H.build_hyper_repvgg('A0', **TINY)
    randomize_bn(m, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a in m.alpha_parameters():
            a.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    k = 2  # stage1.1: has an identity branch
    for kept in (('D', 'O', 'I'), ('D', 'O'), ('D', 'I'), ('O', 'I'), ('D',), ('O',), ('I',)):
        m.set_kept(k, kept)
        outs = []
        for g in m.valid_layouts(k):
            m.set_layout(k, g)
            outs.append(m(x))
        for o in outs[1:]:
            assert rel_err(o, outs[0]) <= 1e-4, kept


# ------------------------------------------------------------------ state, gradients, pruning
def test_set_layout_keeps_state_dict_keys_and_alpha():
    m = H.build_hyper_repvgg('A0', **TINY)
    keys = list(m.state_dict())
    alpha = [a.detach().clone() for a in m.alpha_parameters()]
    for k in range(m.num_blocks):
        for g in m.valid_layouts(k):
            m.set_layout(k, g)
            assert list(m.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(alpha, m.alpha_parameters()))
    assert not any(n.endswith('id_tensor') for n, _ in m.named_buffers())


@pytest.mark.parametrize('gamma', range(14), ids=['layout-grad-g{}'.format(g) for g in range(14)])
def test_gradients_reach_alpha_in_every_layout(gamma):
    block, x = make_block('id_g1', gamma)
    block.kept.copy_(torch.tensor([b in H.LAYOUTS[gamma].branches for b in H.BRANCHES]))
    block.layout = gamma
    block(x).sum().backward()
    for i, b in enumerate(H.BRANCHES):
        if b in H.LAYOUTS[gamma].branches:
            assert block.alpha.grad[i].abs() > 0, b
        else:
            assert block.alpha.grad[i] == 0, b


def test_only_alpha_is_trainable_and_bn_stays_frozen_in_train_mode():
    m = H.build_hyper_repvgg('A0', **TINY).train()
    assert {n.rsplit('.', 1)[-1] for n, p in m.named_parameters() if p.requires_grad} == {'alpha'}
    assert not any(mod.training for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
    assert any(mod.training for mod in H.build_hyper_repvgg('A0', adapt_bn=True, **TINY).train().modules()
               if isinstance(mod, nn.BatchNorm2d))


def test_prune_and_set_layout_errors_name_block_and_gamma():
    m = H.build_hyper_repvgg('A0', **TINY)
    m.prune(2, 'D')
    m.prune(2, 'O')
    assert m.kept(2) == frozenset('I') and m.valid_layouts(2) == [2]
    with pytest.raises(ValueError, match='at least one branch'):
        m.prune(2, 'I')
    with pytest.raises(ValueError, match='no branch'):
        m.prune(0, 'I')  # stage0 has no identity
    with pytest.raises(ValueError, match=r'gamma=13.*block 2'):
        m.set_layout(2, 13)


def test_apply_layouts_copies_by_default_and_is_idempotent():
    m = H.build_hyper_repvgg('A0', **TINY)
    gammas = [H.fused_layout(m.kept(k)) for k in range(m.num_blocks)]
    once = H.apply_layouts(m, gammas)
    assert m.layouts() != gammas and once.layouts() == gammas
    twice = H.apply_layouts(once, gammas)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(once(x), twice(x))
    with pytest.raises(ValueError):
        H.apply_layouts(m, [2] * m.num_blocks)


def test_apply_config_sets_kept_and_layouts_and_checks_every_block_first():
    m = H.build_hyper_repvgg('A0', **TINY)
    gammas = [1, 4] + [8 if s.has_identity else 1 for s in m.plan[2:]]
    H.apply_config(m, gammas)
    assert m.layouts() == gammas and m.kept(0) == H.LAYOUTS[1].branches and m.kept(2) == frozenset('OI')
    full = [13 if s.has_identity else 4 for s in m.plan]
    with pytest.raises(ValueError, match=r'gamma=2 is not valid for block 1 \(stage1.0\)'):
        H.apply_config(m, full[:1] + [2] + full[2:])  # stage1.0 has no identity: nothing may change
    assert m.layouts() == gammas
    with pytest.raises(ValueError, match='need 22 layouts'):
        H.apply_config(m, full[:-1])
    H.apply_config(m, full)  # restoring pruned branches is allowed
    assert m.layouts() == full and all(m.kept(k) == frozenset(m.blocks[k].available()) for k in range(m.num_blocks))


def test_callers_apply_configurations_through_apply_config():
    """accuracy.pruning.apply_config and timing.measure.deploy_configuration had their own set_kept/set_layout loops."""
    from accuracy.pruning import PruningError, apply_config
    from timing.measure import deploy_configuration
    m = H.build_hyper_repvgg('A0', **TINY)
    randomize_bn(m, torch.Generator().manual_seed(4))
    gammas = [1, 4] + [8 if s.has_identity else 1 for s in m.plan[2:]]
    with pytest.raises(PruningError, match='not valid for block 1'):
        apply_config(m, [1, 2] + gammas[2:])
    ref = copy.deepcopy(m)
    H.apply_config(ref, gammas)
    edge, server = deploy_configuration(m, gammas, 6)
    assert m.layouts() == gammas and [m.kept(k) for k in range(22)] == [ref.kept(k) for k in range(22)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(server(edge(x)), ref(x)) <= 1e-4


def test_hyper_weights_roundtrip_through_json():
    m = H.build_hyper_repvgg('A0', **TINY)
    with torch.no_grad():
        m.blocks[2].alpha.copy_(torch.tensor([0.5, 1.5, 2.0]))
    m.prune(2, 'O')
    m.set_layout(2, 6)
    d = json.loads(json.dumps(m.hyper_weights()))
    assert 'I' not in d['blocks'][0]['alpha']  # blocks without identity have no virtual identity weight
    fresh = H.build_hyper_repvgg('A0', **TINY)
    fresh.load_hyper_weights(d)
    assert fresh.kept(2) == frozenset('DI') and fresh.layouts()[2] == 6
    assert torch.equal(fresh.blocks[2].alpha, m.blocks[2].alpha)
    d['blocks'][2]['name'] = 'stage9.9'
    with pytest.raises(ValueError, match=r'blocks\[2\].name'):
        fresh.load_hyper_weights(d)


# ------------------------------------------------------------------ split
def test_split_is_exact_for_every_lambda_of_a0():
    m = H.build_hyper_repvgg('A0', **TINY)
    randomize_bn(m, torch.Generator().manual_seed(2))
    x = torch.randn(2, 3, 32, 32)
    full = m(x)
    for lam in range(m.num_blocks + 1):
        edge, server = m.split(lam)
        assert torch.equal(server(edge(x)), full), lam
        names = {k.split('.')[1] for k in edge.state_dict()}
        assert names == {str(i) for i in range(lam)}
        assert all(k.startswith(tuple(s.name + '.' for s in m.plan[:lam])) for k in m.edge_state_dict(lam))


def test_split_of_b3_at_a_few_lambdas():
    m = H.build_hyper_repvgg('B3', num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full = m(x)
        for lam in (0, 1, 11, 27, 28):
            edge, server = m.split(lam)
            assert torch.equal(server(edge(x)), full), lam


def test_edge_export_rebuilds_the_edge_with_fewer_bytes():
    m = H.build_hyper_repvgg('A0', **TINY)
    randomize_bn(m, torch.Generator().manual_seed(3))
    m.prune(5, 'O')  # stage2.2 has an identity branch
    m.set_layout(5, 6)
    lam = 8
    state = m.edge_state_dict(lam)
    edge = H.build_edge(m.spec_dict(), lam, state, m.layouts()[:lam])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(edge(x), m.split(lam)[0](x)) <= 1e-5
    edge_bytes = sum(v.numel() * v.element_size() for v in state.values())
    full_bytes = sum(v.numel() * v.element_size() for v in m.state_dict().values())
    assert edge_bytes < full_bytes
    with pytest.raises(ValueError, match='beyond block'):
        H.build_edge(m.spec_dict(), lam - 1, state, m.layouts()[:lam - 1])
