"""Device-side code runs on the TX2 stack: Python 3.6 syntax, torch 1.10 behaviour, no torchvision/pickle."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hyper_repvgg as H
from conftest import REPO

DEVICE_FILES = ['hyper_repvgg.py', 'client_worker.py', 'comm/__init__.py', 'comm/protocol.py', 'comm/parts.py',
                'timing/__init__.py', 'timing/measure.py', 'timing/flops.py', 'timing/edge_lut.py',
                'step1_measure_lut.py']


def present_device_files():
    return [f for f in DEVICE_FILES if (REPO / f).is_file()]


def test_device_files_are_python36_syntax():
    files = present_device_files()
    vermin = Path(sys.executable).with_name('vermin')  # the venv's console script (vermin has no __main__)
    proc = subprocess.run([str(vermin), '-t=3.6-', '--violations', '--no-tips', *files],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_device_files_never_import_torchvision_or_unpickle():
    for f in present_device_files():
        text = (REPO / f).read_text()
        assert not re.search(r'^\s*(import|from)\s+(torchvision|pickle)\b', text, re.M), f
        assert 'pickle.loads' not in text and 'torch.load(' not in text, f


CROSS_SCRIPT = r'''
import sys, json
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import hyper_repvgg as H
data = np.load(sys.argv[2])
spec = json.loads(str(data['spec']))
m = H.build_hyper_repvgg(spec['name'], num_classes=spec['num_classes'], width_multiplier=spec['width_multiplier'],
                         small_input=spec['small_input'])
m.load_state_dict({k[3:]: torch.from_numpy(data[k]) for k in data.files if k.startswith('sd.')}, strict=True)
m.load_hyper_weights(json.loads(str(data['hyper'])))
x = torch.from_numpy(data['x'])
out = {'torch': np.array(torch.__version__), 'full': m(x).detach().numpy()}
for lam in range(m.num_blocks + 1):
    edge, server = m.split(lam)
    h = edge(x)
    out['server%d' % lam] = server(h).detach().numpy()
    dep = H.build_edge(m.spec_dict(), lam, m.edge_state_dict(lam), m.layouts()[:lam])
    out['deployed%d' % lam] = dep(x).detach().numpy()
    out['edge%d' % lam] = h.detach().numpy()
np.savez(sys.argv[3], **out)
'''


def test_forward_and_split_match_under_python36_torch110(py36_python, tmp_path):
    torch.manual_seed(0)
    m = H.build_hyper_repvgg('A0', num_classes=10, width_multiplier=(0.25, 0.25, 0.25, 0.5))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
        for a in m.alpha_parameters():
            a.uniform_(0.5, 1.5)
    m.prune(2, 'O')
    m.set_layout(2, 6)
    m.set_layout(5, 13)
    x = torch.randn(2, 3, 64, 64)
    arrays = {'sd.' + k: v.numpy() for k, v in m.state_dict().items()}
    np.savez(tmp_path / 'in.npz', x=x.numpy(), spec=np.array(__import__('json').dumps(m.spec_dict())),
             hyper=np.array(__import__('json').dumps(m.hyper_weights())), **arrays)
    (tmp_path / 'run.py').write_text(CROSS_SCRIPT)
    proc = subprocess.run([str(py36_python), str(tmp_path / 'run.py'), str(REPO), str(tmp_path / 'in.npz'),
                           str(tmp_path / 'out.npz')], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / 'out.npz')
    assert str(got['torch']).startswith('1.10')
    with torch.no_grad():
        full = m(x).numpy()
        np.testing.assert_allclose(got['full'], full, rtol=1e-4, atol=1e-4)
        for lam in range(m.num_blocks + 1):
            np.testing.assert_array_equal(got['server%d' % lam], got['full'])  # exact split on the TX2 stack too
            np.testing.assert_allclose(got['deployed%d' % lam], m.split(lam)[0](x).numpy(), rtol=1e-4, atol=1e-4)
