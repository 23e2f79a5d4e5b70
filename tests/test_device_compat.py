"""Device-side code runs on the TX2 stack: Python 3.6 syntax, torch 1.10 behaviour, no torchvision/pickle."""
import ast
import hashlib
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

import hyper_repvgg as H
from comm.bundle import (DEVICE_ENTRY_POINTS, DEVICE_FILES, DEVICE_OPTIONAL_PACKAGES, DEVICE_PACKAGES, SUMS_NAME,
                         bundle_bytes)
from conftest import REPO



def present_device_files():
    missing = [f for f in DEVICE_FILES if not (REPO / f).is_file()]
    assert not missing, f'comm/bundle.py DEVICE_FILES lists missing files: {missing}'
    return list(DEVICE_FILES)


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


def _imports(rel):
    """[(module, lineno, at_module_level)] of every import in the repository file `rel` (relative ones refused)."""
    out = []

    def visit(node, top):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.Import):
                out.extend((a.name, ch.lineno, top) for a in ch.names)
            elif isinstance(ch, ast.ImportFrom):
                assert ch.level == 0, f'{rel}:{ch.lineno}: relative import'
                # `from pkg import name`: name may be a submodule (from comm import protocol)
                out.extend((f'{ch.module}.{a.name}', ch.lineno, top) for a in ch.names
                           if _module_file(f'{ch.module}.{a.name}'))
                out.append((ch.module, ch.lineno, top))
            visit(ch, top and not isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    visit(ast.parse((REPO / rel).read_text()), True)
    return out


def _module_file(mod):
    """The repository file that `import mod` loads (a.b -> a/b.py or a/b/__init__.py), or None."""
    base = REPO.joinpath(*mod.split('.'))
    for f in (base.with_suffix('.py'), base / '__init__.py'):
        if f.is_file():
            return f.relative_to(REPO).as_posix()
    return None


def _package_inits(rel):
    parts = rel.split('/')[:-1]
    return [('/'.join(parts[:i + 1]) + '/__init__.py') for i in range(len(parts))]


def test_device_files_import_only_each_other_stdlib_torch_numpy():
    """Starting from the device's entry points (the worker, step 1 --mode client), the import closure is exactly DEVICE_FILES; the only other imports are the
    standard library, numpy/torch, and the optional packages inside functions (never at import time)."""
    seen, todo, bad = set(), list(DEVICE_ENTRY_POINTS), []
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        todo += _package_inits(rel)
        for mod, line, top in _imports(rel):
            root = mod.split('.')[0]
            if root in sys.stdlib_module_names or root in DEVICE_PACKAGES:
                continue
            if root in DEVICE_OPTIONAL_PACKAGES:
                if top:
                    bad.append(f'{rel}:{line}: optional {mod} imported at module level')
                continue
            f = _module_file(mod)
            if f is None:
                bad.append(f'{rel}:{line}: imports {mod}, neither stdlib, numpy/torch nor a repository module')
            else:
                todo.append(f)
    assert not bad, bad
    assert seen == set(DEVICE_FILES), (f'needed but not in DEVICE_FILES: {sorted(seen - set(DEVICE_FILES))}; '
                                       f'listed but not needed: {sorted(set(DEVICE_FILES) - seen)}')
    assert 'comm/bundle.py' not in DEVICE_FILES


def test_bundle_holds_exactly_the_device_files_with_their_checksums():
    data = bundle_bytes()
    assert data == bundle_bytes()  # reproducible
    with tarfile.open(fileobj=io.BytesIO(data), mode='r:gz') as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert set(files) == set(DEVICE_FILES) | {SUMS_NAME}
    sums = dict(reversed(line.split('  ', 1)) for line in files[SUMS_NAME].decode().splitlines())
    assert set(sums) == set(DEVICE_FILES)
    for rel in DEVICE_FILES:
        assert files[rel] == (REPO / rel).read_bytes()
        assert sums[rel] == hashlib.sha256(files[rel]).hexdigest(), rel


def test_bundle_command_writes_the_tarball_and_refuses_a_directory(tmp_path):
    out = tmp_path / 'tx2.tar.gz'
    proc = subprocess.run([sys.executable, '-m', 'comm.bundle', str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == bundle_bytes() and f'{len(DEVICE_FILES)} files' in proc.stderr
    proc = subprocess.run([sys.executable, '-m', 'comm.bundle', str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and 'is a directory' in proc.stderr


def test_readme_copies_the_device_side_with_the_bundle():
    readme = (REPO / 'README.md').read_text()
    assert 'python -m comm.bundle' in readme
    for rel in DEVICE_FILES:  # no hand-written file list beside the manifest
        assert not re.search(r'tar c\S*\s.*' + re.escape(rel), readme), rel


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
