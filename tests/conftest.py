"""Shared fixtures.  Fixtures of one area live in that area's test file; this file holds the cross-cutting ones."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PY36_VENV = Path(os.environ.get('HYPERREPVGG_PY36_VENV',
                                Path.home() / '.cache' / 'hyperrepvgg' / 'py36-torch1.10.2'))


def _pyenv_python36():
    """pyenv's CPython 3.6.15, or None."""
    pyenv = shutil.which('pyenv')
    if pyenv is None:
        return None
    try:
        root = subprocess.run([pyenv, 'root'], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    exe = Path(root) / 'versions' / '3.6.15' / 'bin' / 'python'
    return exe if exe.is_file() else None


@pytest.fixture(scope='session')
def py36_python():
    """Python 3.6.15 with torch 1.10.2 and numpy<1.20: the Jetson TX2 (JetPack 4.6) stack, on the CPU.

    Built once from pyenv's CPython 3.6.15 and cached under ~/.cache (about 30 s); skips with the reason
    when pyenv has no 3.6.15 or the packages cannot be installed.
    """
    exe = PY36_VENV / 'bin' / 'python'
    check = [str(exe), '-c', 'import torch, numpy; assert torch.__version__.startswith("1.10.2")']
    if exe.is_file() and subprocess.run(check, capture_output=True, timeout=120).returncode == 0:
        return exe
    base = _pyenv_python36()
    if base is None:
        pytest.skip('the TX2 stack check needs pyenv with CPython 3.6.15 installed (`pyenv versions` lists none)')
    try:
        subprocess.run([str(base), '-m', 'venv', '--clear', str(PY36_VENV)], check=True, timeout=300,
                       capture_output=True)
        pip = [str(exe), '-m', 'pip', 'install', '-q']
        subprocess.run(pip + ['pip==21.3.1'], check=True, timeout=600, capture_output=True)
        subprocess.run(pip + ['torch==1.10.2', 'numpy<1.20'], check=True, timeout=900, capture_output=True)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f'could not build the Python 3.6 + torch 1.10.2 venv at {PY36_VENV}: {e}')
    return exe
