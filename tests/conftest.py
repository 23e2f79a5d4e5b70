"""Shared fixtures.  Fixtures of one area live in that area's test file; this file holds the cross-cutting ones."""
import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
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


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (restored after): a server and its workers on the same cores, each with one
    thread, do not stall each other.  Real-mode modules take it with pytest.mark.usefixtures('one_torch_thread')."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pruned_a0(width, small_input=False, layouts=((2, 13), (4, 10))):
    """A HyperRepVGG-A0 (10 classes) in eval mode with seeded random BN statistics and alphas, branch O of block 3
    pruned and the given (block, layout) pairs set: the deployable model of the real-mode and part-file tests."""
    import torch

    import hyper_repvgg as H
    from timing.measure import randomize_bn_
    torch.manual_seed(0)
    m = H.build_hyper_repvgg('A0', num_classes=10, width_multiplier=tuple(width), small_input=small_input)
    g = torch.Generator()
    g.manual_seed(1)
    randomize_bn_(m, g)
    with torch.no_grad():
        for a in m.alpha_parameters():
            a.uniform_(0.5, 1.5, generator=g)
    m.prune(3, 'O')
    for block, layout in layouts:
        m.set_layout(block, layout)
    return m.eval()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='session')
def sshd(tmp_path_factory):
    """An sshd of the test session's own on 127.0.0.1 (a host key and a user key of its own, TCP forwarding on),
    for the workers' paramiko tunnels and `ssh -L`; skips with the reason when sshd or ssh-keygen is absent or it does
    not start.  -> {'port', 'key' (the user key file), 'known_hosts', 'user', 'dir'}; stopped at the end."""
    exe = Path('/usr/sbin/sshd')
    if not exe.is_file() or not shutil.which('ssh-keygen'):
        pytest.skip('needs openssh-server (/usr/sbin/sshd) and ssh-keygen')
    d = tmp_path_factory.mktemp('sshd')
    for name in ('host_key', 'user_key'):
        subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', str(d / name)], check=True, timeout=60)
    (d / 'authorized_keys').write_text((d / 'user_key.pub').read_text())
    os.chmod(d / 'authorized_keys', 0o600)
    port = free_port()
    (d / 'sshd_config').write_text(
        f'Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n'
        f'AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin yes\nPubkeyAuthentication yes\n'
        'PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n'
        'AllowTcpForwarding yes\n')
    if os.geteuid() == 0:
        try:
            os.makedirs('/run/sshd', exist_ok=True)  # sshd's privilege-separation directory
        except OSError as e:
            pytest.skip(f'sshd needs /run/sshd: {e}')
    log = open(d / 'sshd.log', 'w')
    proc = subprocess.Popen([str(exe), '-D', '-e', '-f', str(d / 'sshd_config')], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip(f'sshd did not start: {(d / "sshd.log").read_text()[-500:]}')
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.skip('sshd did not accept connections within 15 s')
    host_pub = (d / 'host_key.pub').read_text().split()
    (d / 'known_hosts').write_text(f'[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n')
    yield {'port': port, 'key': d / 'user_key', 'known_hosts': d / 'known_hosts', 'user': getpass.getuser(),
           'dir': d}
    proc.terminate()
    proc.wait(10)
    log.close()
