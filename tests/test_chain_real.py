"""Real mode over a chain of devices on loopback: three hops (two client_worker.py processes and this server) with
link emulators between them, each hop's part deployed as a part file, the output against the unsplit model's, the
per-stage and per-link measurements and their prediction; the K = 2 case through the same code; hostile peers on a
listening hop; a Python 3.6 + torch 1.10 relay hop."""
import os
import socket
import time

import pytest
import torch

import test_real_mode as R
from comm import parts as PF
from comm import protocol as P
from comm.localdevice import LocalChain
from conftest import pruned_a0
from comm.session import Hop, ServerSession, SessionError, predict_chain, run_chain
from data.normalize import normalize_batch
from test_hostile_peers import frame, wait_closed

pytestmark = [pytest.mark.network, pytest.mark.usefixtures('one_torch_thread')]
TOKEN = 'chain-token'
SPLITS = (3, 10)  # hop 0: blocks 0..2, hop 1: blocks 3..9, this server: blocks 10..21 and the classifier
RATES_MBPS = (20.0, 10.0)  # link 0 (hop 0 -> hop 1) and link 1 (hop 1 -> server), each with 2 ms one way
BATCH = 4


@pytest.fixture(scope='module')
def net():
    """test_real_mode's pruned, re-laid-out HyperRepVGG-A0 (width 0.25, 32 px, 10 classes)."""
    return pruned_a0((0.25, 0.25, 0.25, 0.25), small_input=True)


@pytest.fixture(scope='module')
def images():
    g = torch.Generator()
    g.manual_seed(5)
    return torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g)


def reference(net, images):
    with torch.no_grad():
        return net(normalize_batch(images, R.MEAN, R.STD))


def start_chain(log_dir, rates=(None, None), pythons=None):
    """comm.localdevice.LocalChain: hop 0 and hop 1 (listening for hop 0), a session each, the handshake deadline 3 s."""
    return LocalChain(2, rates, 2.0, TOKEN, pythons, log_dir, io_timeout_s=R.IO_TIMEOUT, handshake_timeout_s=3)


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
    with start_chain(tmp_path_factory.mktemp('chain'), RATES_MBPS) as c:
        yield c


def test_chain_parts_cover_the_model_and_a_bad_chain_is_refused(net):
    files = PF.chain_bytes(net, SPLITS, 32, R.MEAN, R.STD)
    metas = [PF.load_part(f)[1] for f in files]
    assert [PF.part_range(m) for m in metas] == [(0, 3), (3, 10), (10, net.num_blocks)]
    assert [m['head'] for m in metas] == [False, False, True]
    x = normalize_batch(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), R.MEAN, R.STD)
    with torch.no_grad():
        y = x
        for f in files:
            y = PF.load_part(f)[0](y)
        assert torch.allclose(y, net(x), rtol=1e-4, atol=1e-4)
    empty = PF.chain_bytes(net, (0, net.num_blocks), 32, R.MEAN, R.STD)  # empty first and last stages
    assert [PF.part_range(PF.load_part(f)[1]) for f in empty] == [(0, 0), (0, net.num_blocks),
                                                                 (net.num_blocks, net.num_blocks)]
    with pytest.raises(ValueError, match='non-decreasing'):
        PF.chain_bytes(net, (10, 3), 32)
    with ServerSession(port=0, connect_timeout_s=1) as sess:
        with pytest.raises(SessionError, match='consecutive ranges'):
            run_chain([files[0], files[2]], [Hop(sess)], torch.zeros(1, 3, 32, 32, dtype=torch.uint8), [0], 1)
        with pytest.raises(SessionError, match=r'hops\[0\].next_addr must be the HOST:PORT'):
            run_chain(files, [Hop(sess), Hop(sess)], torch.zeros(1, 3, 32, 32, dtype=torch.uint8), [0], 1)
    p = predict_chain([2.0, 3.0, 1.0], [65536, 16384], [{'bandwidth_mbps': 20}, {'bandwidth_mbps': 10}], 4)
    assert p['bottleneck'] == 'link 0->1' and p['period_ms'] == pytest.approx(65536 * 8 / 20e6 * 1e3)


def test_listening_hop_survives_hostile_peers_then_serves_the_chain(chain, net, images):
    """Whatever connects to hop 1's --listen first (garbage, silence, an oversized hello, a wrong token, a replayed
    proof, an authenticated connection of another run) is refused in one log line; the hop goes on."""
    port = chain.hellos[1]['listen_port']
    attacks = {
        'garbage': (lambda s: s.sendall(os.urandom(200)), 'bad magic'),
        'silent': (lambda s: None, 'handshake deadline'),
        'oversized hello': (lambda s: (P.recv_frame(s, P.PREAUTH_LIMITS), s.sendall(
            frame('hello', {'nonce': P.make_nonce()}, plen=500 * 2 ** 20))), 'exceeds the limit'),
        'wrong token': (lambda s: _prove(s, lambda ns, nw: P.auth_proof('not-the-token', 'worker', ns, nw)),
                        'wrong or missing token'),
        'replayed proof': (lambda s: _prove(s, lambda ns, nw: P.auth_proof(TOKEN, 'worker', P.make_nonce(), nw)),
                           'wrong or missing token'),
        'reflected proof': (lambda s: _prove(s, lambda ns, nw: P.auth_proof(TOKEN, 'server', ns, nw)),
                            'wrong or missing token'),
        'no info': (lambda s: _prove(s, lambda ns, nw: P.auth_proof(TOKEN, 'worker', ns, nw), info=None),
                    '"info" object'),
    }
    for name, (attack, _) in attacks.items():
        s = socket.create_connection(('127.0.0.1', port), timeout=10)
        try:
            try:
                attack(s)
            except (OSError, P.ProtocolError):
                pass
            wait_closed(s, 8)  # the handshake deadline is 3 s (--connect_timeout_s)
        finally:
            s.close()
        assert chain.procs[0].poll() is None, name  # procs: the last hop first
    # an authenticated connection of another run (a stale one) is dropped when the run starts
    stale = socket.create_connection(('127.0.0.1', port), timeout=10)
    stale.settimeout(10)
    conn, _ = P.dial_handshake(stale, TOKEN, {'pid': -1}, time.monotonic() + 10)
    P.send_frame(conn, 'request', {'cmd': 'stream', 'run': 'stale'})
    files = PF.chain_bytes(net, SPLITS, 32, R.MEAN, R.STD)
    try:
        res = run_chain(files, chain.hops, images[:8], torch.zeros(8, dtype=torch.long), BATCH)
    finally:
        stale.close()
    assert torch.allclose(res['outputs'], reference(net, images[:8]), rtol=1e-4, atol=1e-4)
    log = R.wait_for_line(chain.logs[1], "not run ", 10)
    assert 'Traceback' not in log
    for name, (_, needle) in attacks.items():
        assert needle in log, (name, needle, log[-3000:])


def _prove(s, mac_of, info={'pid': -1}):
    """Play a dialing hop up to its proof, which is mac_of(nonce of the listener, ours); `info` None: left out."""
    s.settimeout(10)
    ns, nw = P.recv_frame(s, P.PREAUTH_LIMITS).header['nonce'], P.make_nonce()
    s.sendall(P.frame_bytes('hello', {'nonce': nw}))
    assert P.check_proof(TOKEN, 'server', ns, nw, P.recv_frame(s, P.PREAUTH_LIMITS).header['mac'])
    proof = {'mac': mac_of(ns, nw)}
    if info is not None:
        proof['info'] = info
    s.sendall(P.frame_bytes('proof', proof))


def test_three_hops_over_emulated_links_equal_the_unsplit_model_and_are_measured(chain, net, images):
    files = PF.chain_bytes(net, SPLITS, 32, R.MEAN, R.STD)
    links = [{'bandwidth_mbps': r} for r in RATES_MBPS]
    res = run_chain(files, chain.hops, images, torch.zeros(len(images), dtype=torch.long), BATCH, links=links)
    ref = reference(net, images)
    assert res['outputs'].shape == ref.shape and torch.allclose(res['outputs'], ref, rtol=1e-4, atol=1e-4)
    assert res['predictions'] == ref.argmax(1).tolist()
    assert res['batches'] == len(images) // BATCH and res['samples'] == len(images)
    assert [(s['lo'], s['hi'], s['where']) for s in res['stages']] == [(0, 3, 'worker'), (3, 10, 'worker'),
                                                                       (10, net.num_blocks, 'server')]
    assert [s['device'] for s in res['stages']] == ['cpu'] * 3
    for s in res['stages']:
        assert 0 <= s['compute_ms_p10'] <= s['compute_ms'] <= s['compute_ms_p90'], s
    # the bytes on each link: the features of blocks 2 and 9 for a batch, plus the frame's header and MAC
    for link, block in zip(res['links'], (2, 9)):
        with torch.no_grad():
            feats = net.split(block + 1)[0](normalize_batch(images[:BATCH], R.MEAN, R.STD))
        assert feats.numel() * 4 < link['frame_bytes'] < feats.numel() * 4 + 1024, link
        assert link['link_ms'] > 0 and link['measured_mbps'] > 0
    for row in res['per_batch']:
        assert len(row['stage_ms']) == 3 and len(row['link_ms']) == 2 and row['latency_ms'] > 0
    pred = res['predicted']
    assert pred['period_ms'] == pytest.approx(max(pred['stage_ms'] + pred['link_occupancy_ms']))
    assert pred['stage_ms'] == [s['compute_ms'] for s in res['stages']]
    assert res['measured_period_ms'] == pytest.approx(max([s['compute_ms'] for s in res['stages']] +
                                                          [li['link_ms'] for li in res['links']]))
    assert res['steady_throughput_fps'] > 0 and res['throughput_fps'] > 0
    print(f"\nthree hops: steady {res['steady_throughput_fps']:.1f} samples/s measured, "  # noqa: T201 - for -s
          f"{pred['throughput_fps']:.1f} predicted ({pred['bottleneck']}), load {os.getloadavg()[0]:.2f}")


def test_two_devices_through_the_same_chain_code(chain, net, images):
    """K = 2: hop 0 streams to the server on its own session (no next hop), the same run_chain."""
    files = PF.chain_bytes(net, (6,), 32, R.MEAN, R.STD)
    res = run_chain(files, [Hop(chain.sessions[0])], images[:12], torch.zeros(12), BATCH)
    assert torch.allclose(res['outputs'], reference(net, images[:12]), rtol=1e-4, atol=1e-4)
    assert len(res['stages']) == 2 and len(res['links']) == 1 and res['links'][0]['frame_bytes'] > 0


def test_a_failing_relay_hop_is_reported_and_the_chain_recovers(chain, net, images):
    """Hop 0 told to stream to a port nothing listens on: the run fails naming the hop, both sessions are dropped,
    the workers redial and the next run works."""
    files = PF.chain_bytes(net, SPLITS, 32, R.MEAN, R.STD)
    dead = R.free_port()
    with pytest.raises(SessionError, match=r'hop 0: worker failed command run: CommandError: run: cannot stream to '
                                           r'the next hop at 127\.0\.0\.1:\d+'):
        run_chain(files, [Hop(chain.sessions[0], f'127.0.0.1:{dead}'), chain.hops[1]], images[:4],
                  torch.zeros(4), BATCH)
    for s in chain.sessions:
        if s._conn is None:
            s.accept()
    res = run_chain(files, chain.hops, images[:8], torch.zeros(8), BATCH)
    assert torch.allclose(res['outputs'], reference(net, images[:8]), rtol=1e-4, atol=1e-4)


def test_python36_torch110_relay_hop(py36_python, net, images, tmp_path):
    """The relay hop (it listens for hop 0, receives, computes, forwards) under the TX2's Python 3.6 + torch 1.10."""
    with start_chain(tmp_path, pythons=[R.sys.executable, str(py36_python)]) as c:
        hello = c.hellos[1]
        assert hello['python_version'].startswith('3.6') and hello['torch_version'].startswith('1.10')
        files = PF.chain_bytes(net, SPLITS, 32, R.MEAN, R.STD, feature_dtype='fp16')
        res = run_chain(files, c.hops, images[:8], torch.zeros(8), BATCH)
        assert res['stages'][1]['python_version'].startswith('3.6')
        assert torch.allclose(res['outputs'], reference(net, images[:8]), rtol=2e-2, atol=2e-2)  # fp16 features
    assert 'Traceback' not in c.logs[1].read_text()


# ----------------------------------------------------------------------------------------------------------
# Step 2 --mode real --chain: each hop a worker, measured next to the prediction
# ----------------------------------------------------------------------------------------------------------

def _consecutive_free_ports(n):
    """n consecutive ports free on loopback now (the chain's sessions listen on chain_port + k)."""
    for _ in range(50):
        p = R.free_port()
        if p + n > 65535:
            continue
        try:
            socks = []
            for k in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(('127.0.0.1', p + k))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.fail('no consecutive free ports')


def _step2_real_chain(tmp_path, chain, chain_port, *sets):
    from pipeline import step2_initial_throughput_opt as step2
    from test_step2 import OUT, _write_lut
    _write_lut(tmp_path)
    argv = ['--results_dir', str(tmp_path), '--steps', '60', '--restarts', '2', '--mode', 'real', '--chain', chain,
            '--port', str(R.free_port()), '--set', 'loop.measure=false', '--set', 'loop.real_samples=24',
            '--set', f'real.chain_port={chain_port}', '--set', f'real.token={TOKEN}',
            '--set', 'real.connect_timeout_s=60', '--set', f'real.io_timeout_s={R.IO_TIMEOUT}']
    for s in sets:
        argv += ['--set', s]
    assert step2.main(argv) == 0
    import json
    return json.loads((tmp_path / OUT).read_text())


def _check_measured(real, section, n_blocks):
    assert real['predictions_equal_unsplit'] and real['max_abs_diff_vs_unsplit'] < 1e-3
    assert [(s['lo'], s['hi']) for s in real['stages']] == [tuple(r) for r in section['hop_blocks']]
    assert len(real['links']) == 2 and all(li['frame_bytes'] > 0 and li['link_ms'] > 0 for li in real['links'])
    assert real['steady_throughput_fps'] > 0 and real['predicted_lut']['throughput_fps'] > 0
    pm = real['predicted_measured_stages']
    assert pm['stage_ms'] == [s['compute_ms'] for s in real['stages']]
    assert pm['period_ms'] == pytest.approx(max(pm['stage_ms'] + pm['link_occupancy_ms']))
    assert len(real['load_average']['after']) == 3 and real['samples'] == 24


def test_step2_real_chain_over_emulated_links(tmp_path, capsys):
    """Step 2 --mode real --chain edge:wifi,jetson-orin-nano:wifi,server: two client_worker.py hops (the second
    with --listen), link emulators at the wifi preset's rate on both data links, the chosen configuration deployed
    and streamed; the outputs equal the unsplit model's, every stage and link is measured, the prediction next to
    it, and the console shows both."""
    from comm.linkemu import LinkEmulator
    from timing.lut import LINK_PRESETS
    rate = LINK_PRESETS['wifi'].bandwidth_mbps
    cp = _consecutive_free_ports(2)
    listen = R.free_port()
    procs, emus = [], []
    try:
        emus.append(LinkEmulator(('127.0.0.1', 0), ('127.0.0.1', listen), rate, 1.0).start())  # hop 0 -> hop 1
        emus.append(LinkEmulator(('127.0.0.1', 0), ('127.0.0.1', cp + 1), rate, 1.0).start())  # hop 1 -> server
        procs.append(R.start_worker(cp, token=TOKEN, log_path=tmp_path / 'hop0.log'))
        procs.append(R.start_worker(emus[1].port, '--listen', f'127.0.0.1:{listen}', token=TOKEN,
                                    log_path=tmp_path / 'hop1.log'))
        obj = _step2_real_chain(tmp_path, 'edge:wifi,jetson-orin-nano:wifi,server', cp,
                                f'real.chain_next=127.0.0.1:{emus[0].port}')
    finally:
        for p in procs:
            R.stop(p)
        for e in emus:
            e.close()
    ch = obj['chain']
    real = ch['real']
    _check_measured(real, ch, obj['num_blocks'])
    assert real['next_addrs'] == [f'127.0.0.1:{emus[0].port}'] and real['workers'][1]['listen_port'] == listen
    for li, ms in zip(real['links'], real['predicted_lut']['link_ms']):  # what crosses each link is what the LUT
        lut_bytes = ms / 1e3 * rate * 1e6 / 8  # predicts: the activation's bytes, plus the frame's header and MAC
        assert lut_bytes - 1 < li['frame_bytes'] < lut_bytes + 1024, (li, lut_bytes)
    out = capsys.readouterr().out
    assert 'chain measured (real mode, 24 samples' in out and 'predicted' in out and 'load average' in out
    print(f"\nstep 2 real chain: steady {real['steady_throughput_fps']:.1f} samples/s measured, "  # noqa: T201
          f"{real['predicted_lut']['throughput_fps']:.1f} predicted (LUT), "
          f"{real['predicted_measured_stages']['throughput_fps']:.1f} (measured stages), load {os.getloadavg()[0]:.2f}")


def test_step2_real_chain_with_hops_through_ssh_tunnels(sshd, tmp_path):
    """Tunnels as for one worker: hop 0 reaches hop 1's --listen through its --next_ssh paramiko tunnel to the
    test's sshd (real.chain_next left at its default 127.0.0.1:<listen port>, as seen from the SSH host), and
    hop 1 reaches this server through its --ssh tunnel; the chain run goes through both."""
    ssh = ['--ssh_key', str(sshd['key']), '--ssh_known_hosts', str(sshd['known_hosts'])]
    via = f'{sshd["user"]}@127.0.0.1:{sshd["port"]}'
    cp = _consecutive_free_ports(2)
    listen = R.free_port()
    procs = []
    try:
        procs.append(R.start_worker(cp, '--next_ssh', via, *ssh, token=TOKEN, log_path=tmp_path / 'hop0.log'))
        procs.append(R.start_worker(cp + 1, '--listen', f'127.0.0.1:{listen}', '--ssh', via, *ssh, token=TOKEN,
                                    log_path=tmp_path / 'hop1.log'))
        obj = _step2_real_chain(tmp_path, 'edge:ethernet,edge:ethernet,server', cp)
    finally:
        for p in procs:
            R.stop(p)
    ch = obj['chain']
    _check_measured(ch['real'], ch, obj['num_blocks'])
    assert ch['real']['next_addrs'] == [f'127.0.0.1:{listen}']
    assert 'via ssh' in (tmp_path / 'hop1.log').read_text()
    log0 = (tmp_path / 'hop0.log').read_text()
    assert f'to the next hop at 127.0.0.1:{listen} via ssh 127.0.0.1' in log0, log0[-2000:]
    assert 'Traceback' not in log0 and 'Traceback' not in (tmp_path / 'hop1.log').read_text()
