"""Real mode on loopback: comm.session with client_worker.py as a separate process (directly, through an sshd of
the test's own with the worker's paramiko tunnel or `ssh -L`, under Python 3.6 + torch 1.10, over the link
emulator), authentication, a worker killed or stalled, and step 1 --mode real."""
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

import hyper_repvgg as H
from comm import protocol as P
from comm.bundle import bundle_bytes
from comm.linkemu import LinkEmulator
from comm.session import ServerSession, SessionError
from conftest import REPO, free_port, pruned_a0  # noqa: F401 - free_port: R.free_port of other modules
from data.normalize import normalize_batch
from timing.measure import randomize_bn_

pytestmark = [pytest.mark.network, pytest.mark.usefixtures('one_torch_thread')]

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
IO_TIMEOUT = 20.0


@pytest.fixture(scope='module')
def model():
    return pruned_a0((0.25, 0.25, 0.25, 0.25), small_input=True)


@pytest.fixture(scope='module')
def data():
    g = torch.Generator()
    g.manual_seed(2)
    return torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (24,),
                                                                                                 generator=g)


def local_predictions(model, images):
    with torch.no_grad():
        return model(normalize_batch(images, MEAN, STD)).argmax(1).tolist()


def server_part(model, lam):
    return None if lam == model.num_blocks else H.deploy_part(model.split(lam)[1])


def start_worker(port, *extra, python=sys.executable, token=None, log_path=None):
    env = dict(os.environ)
    env.pop(P.TOKEN_ENV, None)
    if token is not None:
        env[P.TOKEN_ENV] = token
    out = open(log_path, 'w') if log_path else subprocess.DEVNULL
    return subprocess.Popen([str(python), str(REPO / 'client_worker.py'), '--port', str(port), '--device', 'cpu',
                             '--threads', '1', '--backoff_max_s', '1', *extra], env=env, stdout=out,
                            stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL, cwd=str(REPO))


def wait_for_line(path, text, timeout_s=90.0):
    """Wait until the log file at `path` contains `text` (e.g. the worker is up: its imports take a while on a
    loaded machine); returns the log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = Path(path).read_text() if Path(path).exists() else ''
        if text in log:
            return log
        time.sleep(0.1)
    pytest.fail(f'{text!r} not in {path} within {timeout_s} s:\n' + (Path(path).read_text()[-2000:] if Path(path).exists() else ''))


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def check_split_runs(sess, model, images, labels, lams):
    """Deploy each lambda, run, and compare with the local model: identical predictions and accuracy."""
    ref = local_predictions(model, images)
    acc = 100.0 * sum(int(p == y) for p, y in zip(ref, labels.tolist())) / len(labels)
    for n, lam in enumerate(lams):
        dep = sess.deploy(model, model.layouts(), lam, MEAN, STD)
        assert dep['lam'] == lam and dep['blocks'] == lam
        assert dep['edge_weight_bytes'] == sum(v.numel() * v.element_size()
                                               for v in model.edge_state_dict(lam).values()) + \
            (sum(p.numel() * 4 for p in model.linear.parameters()) if lam == model.num_blocks else 0)
        res = sess.run(server_part(model, lam), images, labels, batch_size=5)
        assert res['predictions'] == ref, f'lambda={lam}'
        assert res['accuracy_pct'] == pytest.approx(acc)
        assert res['batches'] == 5 and res['samples'] == len(images) and len(res['per_batch']) == 5
        # the same images again: the worker still holds them from the first run (a new deployment keeps them)
        if n > 0:
            assert res['images_reused'] is True and res['upload_s'] == 0.0
        for key in ('throughput_fps', 'steady_throughput_fps', 'period_throughput_fps', 'latency_ms', 'edge_ms',
                    'link_ms', 'server_ms', 'wall_s'):
            assert res[key] is not None and res[key] >= 0, key
        nbytes = [r['bytes'] for r in res['per_batch']]
        per_sample = {0: 3 * 32 * 32, model.num_blocks: 10 * 4}.get(lam)
        if per_sample is not None:  # lambda 0 sends uint8 images, lambda N the logits
            assert nbytes[0] == 5 * per_sample


def test_split_run_through_the_worker_equals_the_local_model(model, data, tmp_path):
    images, labels = data
    with ServerSession(port=0, token='s3cret', connect_timeout_s=60, io_timeout_s=IO_TIMEOUT) as sess:
        worker = start_worker(sess.port, token='s3cret', log_path=tmp_path / 'worker.log')
        try:
            hello = sess.accept()
            assert hello['pid'] == worker.pid and hello['device'] == 'cpu' and hello['torch_version']
            check_split_runs(sess, model, images, labels, (0, 6, model.num_blocks))
            # fp16 features: half the bytes of fp32 on the link
            # other images of the same shape are uploaded, not mistaken for the held ones
            flipped = sess.run(server_part(model, model.num_blocks), images.flip(0), labels.flip(0), batch_size=5)
            assert flipped['images_reused'] is False
            assert flipped['predictions'] == local_predictions(model, images.flip(0))
            sess.deploy(model, model.layouts(), 6, MEAN, STD, feature_dtype='fp16')
            half = sess.run(server_part(model, 6), images, labels, batch_size=5)
            with torch.no_grad():
                h = model.split(6)[0](normalize_batch(images[:5], MEAN, STD))
            assert half['per_batch'][0]['bytes'] == h.numel() * 2
            # a failing command answers an error and the worker stays usable
            with pytest.raises(SessionError, match='unknown command'):
                sess.request('no_such_command')
            with pytest.raises(SessionError, match='not valid for block'):
                bad = list(model.layouts())
                bad[3] = 13  # block 3 had its 1x1 pruned: the fused D+O+I layout is not valid
                sess.deploy(model, bad, 5, MEAN, STD)
            with pytest.raises(SessionError, match='probe reply_bytes'):
                sess.request('probe', {'reply_bytes': 2 ** 40})
            probe = sess.probe_link([1024, 2 ** 20, 2 ** 22], repeats=2)  # loopback: large sizes for a clear slope
            assert probe['bandwidth_mbps'] > 0 and len(probe['samples']) == 6
        finally:
            sess.close()
            try:
                worker.wait(10)  # bye, then it dials again: still running
            except subprocess.TimeoutExpired:
                pass
            stop(worker)


def test_wrong_or_missing_token_is_refused_and_both_sides_stay_up(tmp_path):
    """Tokens that differ, a worker without one, a server without one: nothing runs, the server names the reason
    when it stops waiting, and the worker, which cannot tell a misconfigured server from a spoofed one, logs one
    line per attempt and keeps dialing (within its backoff)."""
    cases = (('right', 'wrong', 'the tokens differ'), ('right', None, 'the server requires a token'),
             (None, 'mine', 'could not prove that it holds the token'))
    for i, (server_token, worker_token, expect) in enumerate(cases):
        with ServerSession(port=0, token=server_token, connect_timeout_s=5, io_timeout_s=IO_TIMEOUT) as sess:
            log_path = tmp_path / f'worker{i}.log'
            worker = start_worker(sess.port, token=worker_token, log_path=log_path)
            try:
                wait_for_line(log_path, 'worker pid')
                with pytest.raises(SessionError, match=r'connection\(s\) refused, the last: worker at .* refuses: .*'
                                   + expect):
                    sess.accept()
                assert worker.poll() is None  # still dialing
                log = log_path.read_text()
                assert 'session started' not in log and expect in log and 'Traceback' not in log
                with pytest.raises(SessionError, match='call accept'):
                    sess.probe_link([1, 2])
            finally:
                stop(worker)


def test_killed_worker_is_reported_within_the_timeout_and_a_restarted_one_reconnects(model, tmp_path):
    images = torch.randint(0, 256, (3000, 3, 32, 32), dtype=torch.uint8)
    labels = torch.zeros(3000, dtype=torch.long)
    with ServerSession(port=0, connect_timeout_s=60, io_timeout_s=IO_TIMEOUT) as sess:
        worker = start_worker(sess.port)
        try:
            sess.accept()
            sess.deploy(model, model.layouts(), 8, MEAN, STD)
            sess.upload(images[:10])  # warm the path
            timer = threading.Timer(1.5, worker.kill)
            timer.start()
            t0 = time.monotonic()
            with pytest.raises(SessionError, match='connection lost during run'):
                sess.run(server_part(model, 8), images, labels, batch_size=1)
            assert time.monotonic() - t0 < IO_TIMEOUT
            timer.join()
            worker.wait(10)
            worker = start_worker(sess.port)
            hello = sess.accept()  # the session resumes with the restarted worker
            assert hello['pid'] == worker.pid
            assert sess.request('ping')[0]['t'] > 0
            # the new worker holds no images: the same ones as before the drop are uploaded again, not assumed
            sess.deploy(model, model.layouts(), 8, MEAN, STD)
            again = sess.run(server_part(model, 8), images, labels, batch_size=100)
            assert again['images_reused'] is False and again['samples'] == len(images)
            # a stalled worker (SIGSTOP: no data, no heartbeat) is reported after io_timeout_s, naming it
            sess.io_timeout_s = 2.0
            sess._conn.settimeout(2.0)
            os.kill(worker.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(SessionError, match=r'silent for real.io_timeout_s = 2 s'):
                sess.request('measure_lut', {})
            assert time.monotonic() - t0 < 10
        finally:
            if worker.poll() is None:
                os.kill(worker.pid, signal.SIGCONT)
            stop(worker)


def test_step1_real_mode_writes_measured_link_and_merged_lut(tmp_path):
    from artifacts import load_artifact
    from timing import lut as L
    from pipeline import step1_measure_lut as step1
    port = free_port()
    worker = start_worker(port, log_path=tmp_path / 'worker.log')
    try:
        step1.main(['--mode', 'real', '--port', str(port), '--results_dir', str(tmp_path), '--dataset', 'synthetic',
                    '--input_size', '16', '--repeats', '2', '--warmup', '1', '--no_validate',
                    '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25', '--set', 'real.probe_sizes_kb=4,1024,4096',
                    '--set', 'real.connect_timeout_s=60', '--set', 'real.probe_repeats=2'])
    finally:
        stop(worker)
    link = load_artifact(tmp_path / 'link.json', 'link')
    assert link['source'] == 'measured' and link['measured'] is True
    assert link['link']['name'] == 'measured' and len(link['probe']['samples']) == 6
    lut = L.load_lut(tmp_path / 'hardware_lut_complete.json')
    assert lut['link']['bandwidth_mbps'] == pytest.approx(link['probe']['bandwidth_mbps'])
    edge = L.load_side(tmp_path / 'lut_edge.json', 'edge')
    assert edge['source'] == 'measured' and edge['metadata']['device'] == 'cpu'


def test_probe_over_the_emulated_link_measures_the_configured_rate(model, data):
    images, labels = data
    with ServerSession(port=0, connect_timeout_s=60, io_timeout_s=IO_TIMEOUT) as sess, \
            LinkEmulator(('127.0.0.1', 0), ('127.0.0.1', sess.port), rate_mbps=20, delay_ms=5) as emu:
        worker = start_worker(emu.port)
        try:
            sess.accept()
            probe = sess.probe_link([16384, 131072, 524288, 1048576], repeats=2)
            assert probe['bandwidth_mbps'] == pytest.approx(20, rel=0.15)
            assert probe['latency_ms'] == pytest.approx(5, abs=4)
            check_split_runs(sess, model, images, labels, (6,))
        finally:
            sess.close()
            stop(worker)


# ----------------------------------------------------------------------------------------------------------
# Through a real sshd of the test's own
# ----------------------------------------------------------------------------------------------------------

def test_split_run_through_the_workers_paramiko_ssh_tunnel(sshd, model, data, tmp_path):
    pytest.importorskip('paramiko')
    images, labels = data
    with ServerSession(port=0, token='tok', connect_timeout_s=60, io_timeout_s=IO_TIMEOUT) as sess:
        worker = start_worker(sess.port, '--ssh', f'{sshd["user"]}@127.0.0.1:{sshd["port"]}', '--ssh_key',
                              str(sshd['key']), '--ssh_known_hosts', str(sshd['known_hosts']), token='tok',
                              log_path=tmp_path / 'worker.log')
        try:
            try:
                sess.accept()
            except SessionError:
                pytest.fail('worker did not come through the tunnel:\n' + (tmp_path / 'worker.log').read_text()[-2000:])
            assert 'via ssh' in (tmp_path / 'worker.log').read_text()
            check_split_runs(sess, model, images, labels, (0, 6, model.num_blocks))
        finally:
            sess.close()
            stop(worker)


def accept_py36(sess, log_path):
    """Accept the Python 3.6 + torch 1.10 worker (its log in the failure) and check that it is that stack."""
    try:
        hello = sess.accept()
    except SessionError:
        pytest.fail('py36 worker did not connect:\n' + Path(log_path).read_text()[-2000:])
    assert hello['python_version'].startswith('3.6') and hello['torch_version'].startswith('1.10')
    return hello


def test_python36_torch110_worker_through_an_ssh_L_tunnel(py36_python, sshd, model, data, tmp_path):
    """The README flow: `ssh -N -L PORT:127.0.0.1:PORT user@server` on the device, then client_worker.py."""
    if not shutil.which('ssh'):
        pytest.skip('needs the OpenSSH client (ssh)')
    images, labels = data
    local = free_port()
    with ServerSession(port=0, token='tok36', connect_timeout_s=90, io_timeout_s=60) as sess:
        tunnel = subprocess.Popen(['ssh', '-N', '-L', f'{local}:127.0.0.1:{sess.port}', '-i', str(sshd['key']),
                                   '-p', str(sshd['port']), '-o', f'UserKnownHostsFile={sshd["known_hosts"]}',
                                   '-o', 'StrictHostKeyChecking=yes', '-o', 'BatchMode=yes',
                                   '-o', 'ExitOnForwardFailure=yes', f'{sshd["user"]}@127.0.0.1'],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        worker = start_worker(local, python=py36_python, token='tok36', log_path=tmp_path / 'worker36.log')
        try:
            accept_py36(sess, tmp_path / 'worker36.log')
            check_split_runs(sess, model, images, labels, (0, 6, model.num_blocks))
        finally:
            sess.close()
            stop(worker)
            stop(tunnel)


def test_server_refuses_a_non_loopback_host_without_allow_remote():
    with pytest.raises(SessionError, match='allow_remote'):
        ServerSession(host='0.0.0.0', port=0)


def test_accept_without_a_worker_times_out_naming_the_timeout():
    with ServerSession(port=0, connect_timeout_s=0.5) as sess:
        t0 = time.monotonic()
        with pytest.raises(SessionError, match='connect_timeout_s = 0.5 s'):
            sess.accept()
        assert time.monotonic() - t0 < 5


def test_linkemu_cli_help():
    out = subprocess.run([sys.executable, '-m', 'comm.linkemu', '--help'], cwd=str(REPO), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and '--rate_mbps' in out.stdout


def test_the_device_side_files_alone_run_the_worker(tmp_path):
    """Exactly the files the bundle (python -m comm.bundle, the README's copy command) carries suffice, and none pulls
    in config.py or a server-side package."""
    with tarfile.open(fileobj=io.BytesIO(bundle_bytes()), mode='r:gz') as tar:
        tar.extractall(tmp_path, filter='data')
    code = ('import sys, client_worker; heavy = ("config", "artifacts", "scipy", "fvcore", "torchvision", "paramiko", '
            '"matplotlib", "timing.lut", "comm.session"); bad = [m for m in sys.modules if m in heavy or '
            'm.split(".")[0] in heavy[:7]]; assert not bad, bad')
    proc = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
    assert proc.returncode == 0, proc.stderr[-2000:]  # (vermin -t=3.6- on these files: test_device_compat.py)


class _Recorder(torch.nn.Module):
    """A server part that keeps what the worker streamed to it (the edge part's output) before running `part`."""

    def __init__(self, part):
        super().__init__()
        self.part, self.seen = part, []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.part(x)


def test_python36_torch110_worker_runs_a_mobilenet_v2_edge_part_equal_to_torchvision(py36_python, data, tmp_path):
    """Issue 18: a plain network's edge part, sent as raw tensors (load_edge) and as a part file (load_part), runs on
    the TX2 stack (chain_nets' torch-only blocks, no torchvision) and streams what torchvision's blocks compute."""
    from comm import parts as PF
    from comm.session import deploy_part_file
    from data._torchvision import torchvision_chain_net
    images, labels = data
    torch.manual_seed(3)
    tv = torchvision_chain_net({'name': 'mobilenet_v2', 'num_classes': 10, 'width_multiplier': [0.25] * 4,
                                'small_input': False})
    g = torch.Generator()
    g.manual_seed(4)
    tv = randomize_bn_(tv, g).eval()
    x = normalize_batch(images, MEAN, STD)
    ref = local_predictions(tv, images)
    with ServerSession(port=0, token='mb36', connect_timeout_s=90, io_timeout_s=60) as sess:
        worker = start_worker(sess.port, python=py36_python, token='mb36', log_path=tmp_path / 'mbv2.log')
        try:
            accept_py36(sess, tmp_path / 'mbv2.log')
            for lam, how in ((0, 'tensors'), (7, 'tensors'), (7, 'part file'), (tv.num_blocks, 'tensors')):
                if how == 'tensors':
                    dep = sess.deploy(tv, tv.layouts(), lam, MEAN, STD)
                    assert dep['blocks'] == lam and dep['edge_weight_bytes'] == sum(
                        v.numel() * v.element_size() for v in tv.edge_state_dict(lam).values()) + \
                        (sum(p.numel() * 4 for p in tv.linear.parameters()) if lam == tv.num_blocks else 0)
                else:
                    deploy_part_file(sess, PF.part_bytes(tv, lam, 'edge', 32, MEAN, STD))
                server = None if lam == tv.num_blocks else _Recorder(tv.split(lam)[1])
                res = sess.run(server, images, labels, batch_size=6)
                assert res['predictions'] == ref, (lam, how)
                if 0 < lam < tv.num_blocks:
                    with torch.no_grad():
                        want = tv.split(lam)[0](x)
                    assert torch.allclose(torch.cat(server.seen), want, rtol=1e-4, atol=1e-5), (lam, how)
            with pytest.raises(SessionError, match='plain network'):
                sess.request('load_edge', {'arch': tv.spec_dict(), 'lam': 1, 'layouts': [13], 'kept': [['D']],
                                           'mean': list(MEAN), 'std': list(STD)},
                             list(tv.edge_state_dict(1).items()))
        finally:
            sess.close()
            stop(worker)


def test_mobilenet_v2_steps_1_2_and_the_sweep_in_real_mode_on_the_python36_worker(py36_python, tmp_path):
    """A plain network through real mode end to end: the TX2-stack worker measures its edge LUT, step 2 measures its
    closed loop through the worker, and the sweep deploys and streams every split point."""
    import csv

    from artifacts import load_artifact
    from pipeline import split_sweep
    from pipeline import step1_measure_lut as step1
    from pipeline import step2_initial_throughput_opt as step2
    from scripts import random_checkpoint
    ckpt = tmp_path / 'mbv2.pt'
    random_checkpoint.main(['--model', 'mobilenet_v2', '--width', '0.25', '--out', str(ckpt)])
    port = free_port()
    flags = ['--port', str(port), '--results_dir', str(tmp_path / 'r'), '--dataset', 'synthetic', '--model',
             'mobilenet_v2', '--set', 'model.width_multiplier=0.25,0.25,0.25,0.25', '--set', 'model.input_size=16',
             '--set', f'model.checkpoint={ckpt}', '--set', 'real.connect_timeout_s=90', '--set', 'real.probe_repeats=2',
             '--set', 'real.probe_sizes_kb=4,1024', '--set', 'loop.top_k=2']
    worker = start_worker(port, python=py36_python, log_path=tmp_path / 'worker.log')
    try:
        assert step1.main(['--mode', 'real', '--repeats', '2', '--warmup', '1', '--no_validate', *flags]) == 0
        assert step2.main(['--mode', 'real', '--steps', '50', '--restarts', '1', *flags]) == 0
        assert split_sweep.main(['--mode', 'real', '--samples', '8', '--round_trips', '2', '--no_figure', *flags]) == 0
    finally:
        stop(worker)
    edge = load_artifact(tmp_path / 'r' / 'lut_edge.json', 'lut_edge')
    assert edge['source'] == 'measured' and edge['metadata']['python_version'].startswith('3.6')
    with open(tmp_path / 'r' / 'split_latency_results.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and all(r['edge_source'].startswith('measured on the worker') and
                                   r['transfer_source'].startswith('measured') for r in rows)
