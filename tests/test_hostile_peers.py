"""Hostile and broken peers on loopback, both ways: the server keeps waiting for the real worker whatever connects
first (bounded in time and memory before authentication), the worker survives whatever a server sends (one log
line, then it dials again within its backoff), a relayed handshake can neither inject nor hijack, replayed and
reflected proofs are refused, and a silent link or server is detected by the worker, which redials."""
import json
import os
import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest

import test_real_mode as R
from comm import protocol as P
from comm.session import ServerSession, SessionError

pytestmark = pytest.mark.network
TOKEN = 'tok'


def frame(kind, header, version=P.VERSION, plen=0, tail=b''):
    js = header if isinstance(header, bytes) else json.dumps(header).encode()
    return P.FIXED.pack(P.MAGIC, version, P.MESSAGE_TYPES[kind], 0, len(js), plen) + js + tail


def wait_closed(sock, timeout_s):
    """Seconds until the peer closes `sock` (reading and dropping what it sends); fails after timeout_s."""
    t0 = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - t0 < timeout_s:
        try:
            if not sock.recv(65536):
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - t0
    pytest.fail(f'peer did not close the connection within {timeout_s} s')


class Accepting:
    """sess.accept() in a thread: .result is the worker's info or the exception."""

    def __init__(self, sess):
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(sess,), daemon=True)
        self.thread.start()

    def _run(self, sess):
        try:
            self.result = sess.accept()
        except Exception as e:  # noqa: BLE001 - handed to the test
            self.result = e

    def join(self, timeout_s):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), 'accept() did not return'
        return self.result


def _challenge(s):
    ch = P.recv_frame(s, P.PREAUTH_LIMITS)
    assert ch.kind == 'challenge'
    return ch.header['nonce']


def _hello_then_proof(s, proof_of):
    """Read the challenge, send a hello, read the server's proof, send proof_of(ns, nw, server_mac) as ours."""
    ns, nw = _challenge(s), P.make_nonce()
    s.sendall(P.frame_bytes('hello', {'nonce': nw}))
    server_mac = P.recv_frame(s, P.PREAUTH_LIMITS).header.get('mac')
    s.sendall(P.frame_bytes('proof', {'mac': proof_of(ns, nw, server_mac), 'info': {'pid': -1}}))


OLD_NONCES = (P.make_nonce(), P.make_nonce())  # a "recorded" genuine exchange of an earlier connection
ATTACKS = {
    'silent': lambda s: None,
    'garbage': lambda s: s.sendall(os.urandom(200)),
    'one byte every 0.3 s': lambda s: [s.sendall(b'H') or time.sleep(0.3) for _ in range(12)],
    'hello claiming 500 MB': lambda s: (_challenge(s), s.sendall(frame('hello', {'nonce': 'a' * 64},
                                                                        plen=500 * 2 ** 20, tail=b'\0' * 8))),
    'protocol version 1': lambda s: (_challenge(s), s.sendall(frame('hello', {'nonce': 'a' * 64}, version=1))),
    'non-ASCII nonce': lambda s: (_challenge(s), s.sendall(frame('hello', {'nonce': '\u00e9' * 64}))),
    'nested JSON': lambda s: (_challenge(s), s.sendall(frame('hello', b'[' * 3000 + b']' * 3000))),
    'zero-dim shape': lambda s: (_challenge(s), s.sendall(frame('hello', {'tensors': [
        {'name': 'x', 'dtype': 'uint8', 'shape': [0, 2 ** 63]}]}))),
    'wrong proof': lambda s: _hello_then_proof(s, lambda ns, nw, m: 'ab' * 32),
    'replayed proof': lambda s: _hello_then_proof(s, lambda ns, nw, m: P.auth_proof(TOKEN, 'worker', *OLD_NONCES)),
    'reflected server proof': lambda s: _hello_then_proof(s, lambda ns, nw, m: m),
    'info not an object': lambda s: (_challenge(s), None),  # completed below with a valid proof and info=[1]
}


def _info_not_object(s):
    ns, nw = _challenge(s), P.make_nonce()
    s.sendall(P.frame_bytes('hello', {'nonce': nw}))
    P.recv_frame(s, P.PREAUTH_LIMITS)
    s.sendall(P.frame_bytes('proof', {'mac': P.auth_proof(TOKEN, 'worker', ns, nw), 'info': [1]}))


ATTACKS['info not an object'] = _info_not_object


def test_hostile_connections_before_auth_are_refused_and_accept_waits_for_the_worker(tmp_path, caplog):
    hs = 1.5
    with ServerSession(port=0, token=TOKEN, connect_timeout_s=120, io_timeout_s=R.IO_TIMEOUT,
                       handshake_timeout_s=hs) as sess:
        acc = Accepting(sess)
        tracemalloc.start()
        try:
            for name, attack in ATTACKS.items():
                s = socket.create_connection(('127.0.0.1', sess.port), timeout=5)
                try:
                    t0 = time.monotonic()
                    try:
                        attack(s)
                    except OSError:  # the server may hang up while the attack still talks
                        pass
                    left = hs + 3 - (time.monotonic() - t0)
                    wait_closed(s, max(left, 1.0))
                    assert time.monotonic() - t0 < hs + 3, name  # the handshake deadline holds
                finally:
                    s.close()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 * 2 ** 20, peak  # nothing near the 500 MB a hello claimed was allocated
        worker = R.start_worker(sess.port, token=TOKEN, log_path=tmp_path / 'worker.log')
        try:
            info = acc.join(120)
            assert isinstance(info, dict) and info['pid'] == worker.pid, info
            assert sess.request('ping')[0]['t'] > 0
        finally:
            sess.close()
            R.stop(worker)
    refusals = [r.getMessage() for r in caplog.records if 'waiting for the worker' in r.getMessage()]
    assert len(refusals) >= len(ATTACKS)
    for needle in ('handshake deadline', 'bad magic', 'exceeds the limit', 'unsupported protocol version 1',
                   'malformed nonce', 'nests deeper', 'wrong or missing token', '"info" object'):
        assert any(needle in r for r in refusals), (needle, refusals)
    assert all('\n' not in r for r in refusals)


# -- the worker against hostile servers ----------------------------------------------------------------------

def _valid_challenge(hb=0.5):
    return {'nonce': P.make_nonce(), 'auth_required': True, 'heartbeat_s': hb, 'version': P.VERSION}


def _full_handshake(c):
    """Play a genuine server (the test knows the token); returns the SecureChannel."""
    ch = _valid_challenge()
    c.sendall(P.frame_bytes('challenge', ch))
    nw = P.recv_frame(c, P.PREAUTH_LIMITS).header['nonce']
    c.sendall(P.frame_bytes('proof', {'mac': P.auth_proof(TOKEN, 'server', ch['nonce'], nw)}))
    proof = P.recv_frame(c, P.PREAUTH_LIMITS)
    assert P.check_proof(TOKEN, 'worker', ch['nonce'], nw, proof.header['mac'])
    c.sendall(P.frame_bytes('welcome', {}))
    return P.SecureChannel(c, P.session_key(TOKEN, ch['nonce'], nw), 'server')


def _challenge_then(c, header):
    c.sendall(P.frame_bytes('challenge', header))


SERVERS = {  # what a hostile or broken server does with the worker's dial; the worker's expected log line
    'heartbeat_s "abc"': (lambda c: _challenge_then(c, dict(_valid_challenge(), heartbeat_s='abc')), 'heartbeat_s'),
    'heartbeat_s null': (lambda c: _challenge_then(c, dict(_valid_challenge(), heartbeat_s=None)), 'heartbeat_s'),
    'non-ASCII nonce': (lambda c: _challenge_then(c, dict(_valid_challenge(), nonce='\u00e9' * 64)), 'malformed nonce'),
    'nested JSON': (lambda c: c.sendall(frame('challenge', b'[' * 3000 + b']' * 3000)), 'nests deeper'),
    'zero-dim shape': (lambda c: c.sendall(frame('challenge', {'tensors': [
        {'name': 'x', 'dtype': 'uint8', 'shape': [0, 2 ** 63]}]})), 'tensors'),
    'garbage': (lambda c: c.sendall(os.urandom(100)), 'bad magic'),
    'silent': (lambda c: None, 'handshake deadline'),
    'wrong server proof': (lambda c: (_challenge_then(c, _valid_challenge()), P.recv_frame(c, P.PREAUTH_LIMITS),
                                      c.sendall(P.frame_bytes('proof', {'mac': 'cd' * 32}))), 'could not prove'),
    'error frame first': (lambda c: c.sendall(P.frame_bytes('error', {'message': 'authentication failed'})),
                          'refused this worker'),
    'injected request after auth': (lambda c: (_full_handshake(c), c.sendall(P.frame_bytes('request', {
        'cmd': 'ping', 'id': 1}))), 'carries a MAC'),
    'silent after auth': (lambda c: _full_handshake(c), 'not even a heartbeat'),
}


def test_worker_survives_hostile_servers_logs_one_line_each_and_comes_back(tmp_path):
    port = R.free_port()
    listener = socket.create_server(('127.0.0.1', port))
    listener.settimeout(90)
    log_path = tmp_path / 'worker.log'
    worker = R.start_worker(port, '--connect_timeout_s', '2', token=TOKEN, log_path=log_path)
    try:
        for name, (behave, _) in SERVERS.items():
            c, _ = listener.accept()
            try:
                t0 = time.monotonic()
                try:
                    behave(c)
                except (OSError, P.ProtocolError):
                    pass
                wait_closed(c, 12)  # handshake deadline 2 s; idle timeout 4 x 0.5 + 2 = 4 s
                closed = time.monotonic()
                assert worker.poll() is None, name
            finally:
                c.close()
            listener.settimeout(10)
            t_dial = time.monotonic()
            nxt, _ = listener.accept()  # back within its backoff (at most 1 s here) plus start-up slack
            assert time.monotonic() - closed < 6, name
            nxt.close()  # a dial given up at once: one more line, and the next case waits for the next dial
            del t0, t_dial
            time.sleep(0.1)
        listener.close()
        with ServerSession(port=port, token=TOKEN, connect_timeout_s=60, io_timeout_s=R.IO_TIMEOUT) as sess:
            info = sess.accept()
            assert info['pid'] == worker.pid and sess.request('ping')[0]['t'] > 0
    finally:
        listener.close()
        R.stop(worker)
    log = log_path.read_text()
    assert 'Traceback' not in log, log[-3000:]
    for name, (_, needle) in SERVERS.items():
        assert needle in log, (name, needle, log[-3000:])


# -- relay and replay ----------------------------------------------------------------------------------------

def _pipe(a, b, stop):
    a.settimeout(0.2)
    while not stop.is_set():
        try:
            data = a.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not data:
            break
        try:
            b.sendall(data)
        except OSError:
            break
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _read_raw_frame(s):
    """One frame's bytes as they are (MAC trailer included when flagged), without checking anything."""
    fixed = P._read_exact(s, P.FIXED.size, 'fixed', False)
    _, _, _, flags, hlen, plen = P.FIXED.unpack(bytes(fixed))
    rest = P._read_exact(s, hlen + plen + (P.MAC_BYTES if flags & P.FLAG_MAC else 0), 'rest', True)
    return bytes(fixed + rest)


def test_relay_cannot_get_an_answer_inject_or_hijack_only_pass_frames_on(tmp_path, caplog):
    """A process the worker dials by mistake (M) between it and the real server (S).
    1. The old attack: M forwards S's challenge; the worker answers only with its nonce, refuses M's made-up proof.
    2. M relays the whole handshake, then forges the worker's first reply: S refuses it (MAC), nothing ran.
    3. M as a plain pipe: the session works; relaying unchanged is all a relay can do."""
    m_port = R.free_port()
    m = socket.create_server(('127.0.0.1', m_port))
    m.settimeout(90)
    with ServerSession(port=0, token=TOKEN, connect_timeout_s=120, io_timeout_s=R.IO_TIMEOUT) as sess:
        acc = Accepting(sess)
        worker = R.start_worker(m_port, token=TOKEN, log_path=tmp_path / 'worker.log')
        stop = threading.Event()
        try:
            # 1: answer relay
            w, _ = m.accept()
            s = socket.create_connection(('127.0.0.1', sess.port), timeout=10)
            w.settimeout(10)
            w.sendall(_read_raw_frame(s))  # S's challenge, as is
            hello = P.recv_frame(w, P.PREAUTH_LIMITS)
            assert hello.kind == 'hello' and set(hello.header) == {'nonce'}  # no proof, no device info
            w.sendall(P.frame_bytes('proof', {'mac': 'ef' * 32}))
            assert P.recv_frame(w, P.PREAUTH_LIMITS).kind == 'error'  # the worker refuses and answers nothing
            wait_closed(w, 5)
            w.close()
            s.close()
            # 2: full relay of the handshake, then a forged reply to S's first command
            w, _ = m.accept()
            s = socket.create_connection(('127.0.0.1', sess.port), timeout=10)
            w.settimeout(10)
            for src, dst in ((s, w), (w, s), (s, w), (w, s), (s, w)):  # challenge hello proof proof welcome
                dst.sendall(_read_raw_frame(src))
            request = _read_raw_frame(s)  # S's clock request, MAC'd: M cannot read it into a valid answer
            assert P.FIXED.unpack(request[:20])[3] == P.FLAG_MAC
            forged = b''.join(bytes(p) for p in P.encode_frame('reply', {'id': 1, 'result': {'t': 0.0}}, None,
                                                               P.FLAG_MAC))
            s.sendall(forged + b'\0' * P.MAC_BYTES)
            wait_closed(s, 10)
            s.close()
            w.close()
            assert acc.thread.is_alive()  # S refused the forged session and waits on
            # 3: a plain pipe
            w, _ = m.accept()
            s = socket.create_connection(('127.0.0.1', sess.port), timeout=10)
            for a, b in ((w, s), (s, w)):
                threading.Thread(target=_pipe, args=(a, b, stop), daemon=True).start()
            info = acc.join(60)
            assert isinstance(info, dict) and info['pid'] == worker.pid, info
            assert sess.request('ping')[0]['t'] > 0
        finally:
            stop.set()
            sess.close()
            m.close()
            R.stop(worker)
    refusals = ' | '.join(r.getMessage() for r in caplog.records if 'waiting for the worker' in r.getMessage())
    assert 'fails its MAC check' in refusals, refusals


# -- silent link, dropped server ------------------------------------------------------------------------------

class BlackholeRelay:
    """A loopback relay whose existing connections can be made silent (nothing forwarded either way, nothing
    closed: a link that died without a FIN or RST); connections made later are relayed normally."""

    def __init__(self, target_port):
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.port = self.listener.getsockname()[1]
        self.target, self.conns, self.stop = target_port, [], threading.Event()
        self.listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                a, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            b = socket.create_connection(('127.0.0.1', self.target), timeout=10)
            silent = threading.Event()
            self.conns.append((a, b, silent))
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._forward, args=(x, y, silent), daemon=True).start()

    def _forward(self, x, y, silent):
        x.settimeout(0.2)
        while not self.stop.is_set():
            if silent.is_set():
                time.sleep(0.1)
                continue
            try:
                data = x.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if silent.is_set():  # went silent while this read waited: swallow it, the FIN included
                continue
            if not data:
                try:
                    y.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                y.sendall(data)
            except OSError:  # the far end is gone: close both, as the kernel would (the writer gets a reset)
                x.close()
                y.close()
                return

    def silence(self):
        for _, _, silent in self.conns:
            silent.set()

    def close(self):
        self.stop.set()
        self.listener.close()
        for a, b, _ in self.conns:
            a.close()
            b.close()


def test_silent_link_is_detected_by_the_worker_which_redials_and_a_dropped_server_too(tmp_path):
    """io_timeout_s 2 -> heartbeats every 0.5 s -> the worker calls the server silent after 4 s.  The link goes
    silent while the worker is idle: it redials by itself and the session resumes.  Then the server drops the
    connection in the middle of a run: the worker notices and redials as well."""
    import torch
    with ServerSession(port=0, connect_timeout_s=90, io_timeout_s=2.0) as sess:
        relay = BlackholeRelay(sess.port)
        worker = R.start_worker(relay.port, log_path=tmp_path / 'worker.log')
        try:
            assert sess.accept()['pid'] == worker.pid
            assert sess.request('ping')[0]['t'] > 0
            relay.silence()
            t0 = time.monotonic()
            R.wait_for_line(tmp_path / 'worker.log', 'not even a heartbeat', P.idle_timeout_s(0.5) + 10)
            detected = time.monotonic() - t0
            assert P.idle_timeout_s(0.5) - 0.5 < detected < P.idle_timeout_s(0.5) + 5, detected
            sess.connect_timeout_s = 20
            assert sess.accept()['pid'] == worker.pid  # the worker dialed again by itself
            took = time.monotonic() - t0
            assert took < P.idle_timeout_s(0.5) + 1 + 8, took  # idle timeout + backoff + slack
            # a server that drops mid-run (the worker is streaming): it redials
            model = R.H.build_hyper_repvgg('A0', num_classes=10, width_multiplier=(0.25,) * 4, small_input=True).eval()
            sess.io_timeout_s = R.IO_TIMEOUT
            sess._conn.settimeout(R.IO_TIMEOUT)
            sess.deploy(model, model.layouts(), model.num_blocks, R.MEAN, R.STD)
            images = torch.randint(0, 256, (2000, 3, 32, 32), dtype=torch.uint8)
            timer = threading.Timer(1.0, lambda: sess._conn.sock.shutdown(socket.SHUT_RDWR)
                                    if hasattr(sess._conn, 'sock') else sess._conn.shutdown(socket.SHUT_RDWR))
            timer.start()
            with pytest.raises(SessionError):
                sess.run(None, images, torch.zeros(2000, dtype=torch.long), batch_size=1)
            timer.join()
            assert sess.accept()['pid'] == worker.pid and sess.request('ping')[0]['t'] > 0
            assert worker.poll() is None
        finally:
            sess.close()
            relay.close()
            R.stop(worker)
    assert np.isfinite(took)


def test_ipv6_loopback_listens_or_names_the_problem():
    """real.host=::1: the session listens on IPv6 and speaks the protocol there, or says why it cannot."""
    try:
        sess = ServerSession(host='::1', port=0, connect_timeout_s=5)
    except SessionError as e:
        assert 'cannot listen on ::1' in str(e) and '\n' not in str(e)
        return
    with sess:
        acc = Accepting(sess)
        s = socket.create_connection(('::1', sess.port), timeout=5)
        try:
            ch = P.recv_frame(s, P.PREAUTH_LIMITS)
            assert ch.kind == 'challenge' and ch.header['version'] == P.VERSION
        finally:
            s.close()
        assert isinstance(acc.join(30), SessionError)  # the probe was no worker; none came
