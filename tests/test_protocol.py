"""comm.protocol: frame round trips of every message, malformed and truncated frames, a fuzzed decoder, the HMAC."""
import socket
import struct
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from comm import protocol as P

SMALL = P.Limits(max_frame_bytes=64 * 1024, max_header_bytes=8 * 1024, max_tensors=16, max_dims=4, max_depth=4)


def sample_tensors():
    rng = np.random.default_rng(0)
    return [('u8', rng.integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)),
            ('f32', rng.standard_normal((3, 5)).astype(np.float32)),
            ('f16', torch.randn(7, dtype=torch.float16)),  # torch tensors are accepted as they are
            ('i64', np.arange(5, dtype=np.int64)), ('b', np.array([True, False, True])),
            ('f64', np.float64(3.5) * np.ones(())), ('empty', np.zeros((0, 4), np.float32)),
            ('i8', np.array([-1, 2], np.int8)), ('i16', np.array([300], np.int16)), ('i32', np.array([1 << 20], np.int32))]


def as_numpy(t):
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


@pytest.mark.parametrize('kind', list(P.MESSAGE_TYPES))
def test_every_message_round_trips_through_bytes(kind):
    tensors = sample_tensors()
    header = {'cmd': 'x', 'id': 7, 'nested': {'a': [1, 2.5, None, 'ü']}}
    frame = P.decode_frame(P.frame_bytes(kind, header, tensors))
    assert frame.kind == kind and frame.header == header
    assert list(frame.tensors) == [n for n, _ in tensors]
    for name, t in tensors:
        ref = as_numpy(t)
        got = frame.tensors[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)


@pytest.mark.network
def test_frames_round_trip_over_a_socket_pair_with_large_tensors():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    big = np.random.default_rng(1).standard_normal(3 * 2 ** 18).astype(np.float32)  # 3 MB
    try:
        sender = threading.Thread(target=lambda: [P.send_frame(a, k, {'k': k}, [('x', big)] if k == 'features' else None)
                                                  for k in P.MESSAGE_TYPES])
        sender.start()
        for k in P.MESSAGE_TYPES:
            f = P.recv_frame(b)
            assert f.kind == k and f.header == {'k': k}
            assert list(f.tensors) == (['x'] if k == 'features' else [])
            if k == 'features':
                np.testing.assert_array_equal(f.tensors['x'], big)
        sender.join(10)
        a.close()
        with pytest.raises(P.ConnectionClosed, match='peer closed'):
            P.recv_frame(b)
    finally:
        a.close()
        b.close()


def test_received_tensor_is_usable_by_torch():
    frame = P.decode_frame(P.frame_bytes('features', {}, [('a', np.ones(3, np.uint8)), ('x', np.ones((2, 2), np.float32))]))
    t = torch.from_numpy(frame.tensors['x'])  # 8-byte aligned, writable view on the received buffer
    assert t.sum().item() == 4.0


def fixed(kind=1, hlen=2, plen=0, magic=P.MAGIC, version=P.VERSION, flags=0):
    return P.FIXED.pack(magic, version, kind, flags, hlen, plen)


def framed(js, plen=0, payload=b''):
    """A frame with JSON text `js` (bytes) and a payload, lengths filled in."""
    return fixed(hlen=len(js), plen=plen) + js + payload


def tensor_js(dtype='uint8', shape='[4]'):
    return ('{"tensors":[{"name":"a","dtype":"%s","shape":%s}]}' % (dtype, shape)).encode()


@pytest.mark.parametrize('data,message', [
    (fixed(magic=b'XXXX') + b'{}', 'bad magic'),
    (fixed(version=9) + b'{}', 'unsupported protocol version 9'),
    (fixed(kind=99) + b'{}', 'unknown message type 99'),
    (fixed(flags=1) + b'{}', 'frame flags 0x0001, expected 0x0000'),
    (fixed(hlen=10 ** 6), 'JSON header of 1000000 bytes exceeds'),
    (fixed(plen=2 ** 62), 'exceeds the limit'),
    (fixed(hlen=4) + b'\xff\xfe{}', 'not valid UTF-8 JSON'),
    (fixed(hlen=2) + b'[]', 'must be an object'),
    (framed(b'{"tensors": 5}'), '"tensors" must be a list'),
    (framed(tensor_js('object'), 8, b'\0' * 8), 'needs a string "name" and a "dtype"'),
    (framed(tensor_js(shape='[-4]'), 4, b'\0' * 4), '"shape" must list'),
    (framed(tensor_js(shape='[2.5]'), 4, b'\0' * 4), '"shape" must list'),
    (framed(tensor_js(shape='[5]'), 4, b'\0' * 4), 'more than the 4 payload bytes'),
    (framed(tensor_js(shape='[4]'), 8, b'\0' * 8), 'payload length 8 does not match the 4'),
    (fixed(hlen=2) + b'{}' + b'extra', '5 trailing bytes'),
    (fixed(hlen=2), 'connection closed after 0 of 2 bytes of the JSON header'),
    (fixed()[:7], 'connection closed after 7 of 20 bytes of the fixed frame header'),
    (b'', 'peer closed the connection'),
])
def test_malformed_frames_raise_a_protocol_error_naming_the_problem(data, message):
    with pytest.raises(P.ProtocolError, match=message):
        P.decode_frame(data, SMALL)


def test_duplicate_names_too_many_tensors_and_dims_are_refused():
    with pytest.raises(P.ProtocolError, match='duplicate tensor name'):
        P.decode_frame(P.frame_bytes('reply', {}, [('a', np.ones(1)), ('a', np.ones(1))]))
    with pytest.raises(P.ProtocolError, match='at most 16 entries'):
        P.decode_frame(P.frame_bytes('reply', {}, [(str(i), np.ones(1)) for i in range(17)]), SMALL)
    with pytest.raises(P.ProtocolError, match='at most 4 integers'):
        P.decode_frame(P.frame_bytes('reply', {}, [('a', np.ones((1,) * 5))]), SMALL)
    with pytest.raises(P.ProtocolError, match='exceeds the limit'):
        P.decode_frame(P.frame_bytes('reply', {}, [('a', np.ones(10 ** 5, np.uint8))]), SMALL)
    with pytest.raises(P.ProtocolError, match='cannot be sent'):
        P.frame_bytes('reply', {}, [('a', np.array(['s']))])
    with pytest.raises(P.ProtocolError, match='reserved'):
        P.frame_bytes('reply', {'tensors': 1})


def test_every_truncation_of_a_valid_frame_is_a_protocol_error():
    data = P.frame_bytes('features', {'batch': 3}, [('x', np.arange(40, dtype=np.float32).reshape(2, 20)),
                                                    ('y', np.ones(3, np.uint8))])
    for cut in range(len(data)):
        with pytest.raises(P.ConnectionClosed):
            P.decode_frame(data[:cut])
    assert P.decode_frame(data).header == {'batch': 3}


NASTY_HEADERS = [b'[' * 3000 + b']' * 3000, b'{"a":' * 1300 + b'1' + b'}' * 1300, b'{"x":NaN}', b'{"x":1e999}',
                 b'{"x":' + b'9' * 5000 + b'}', b'"\xff"', b'{"tensors":[{"name":"a","dtype":"uint8","shape":[0,%d]}]}',
                 b'{"tensors":[{"name":"a","dtype":"float64","shape":[%d,%d]}]}', b'{"tensors":[{"name":1,"dtype":"uint8"}]}',
                 b'{"tensors":[{"name":"a","dtype":["uint8"],"shape":[1]}]}', b'{"tensors":{"name":"a"}}',
                 b'{"tensors":[{"name":"a","dtype":"uint8","shape":[true]}]}', b'{"tensors":[null]}', b'{}', b'[]',
                 b'{"tensors":[{"name":"a","dtype":"uint8","shape":[-1,-1]}]}', b'{"a":"\\ud800"}', b'{"a":1}x']


def fuzz_case(rng, valid):
    """One malformed (or accidentally valid) frame: random bytes, lying lengths, bit flips, truncations and
    hostile JSON headers (deep nesting, shape products that overflow or hide behind a zero dimension)."""
    how = rng.randrange(6)
    if how == 0:
        return rng.randbytes(rng.randrange(200))
    if how == 1:
        return fixed(rng.randrange(1, 12), rng.randrange(2 ** 32), rng.randrange(2 ** 64)) + rng.randbytes(rng.randrange(100))
    base = valid[rng.randrange(len(valid))]
    if how == 2:
        flipped = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if how == 3:
        return base[:rng.randrange(len(base))] + rng.randbytes(rng.randrange(64))
    if how == 4:  # lying lengths on a valid frame
        hlen = struct.unpack('!I', base[8:12])[0] + rng.randrange(-8, 9)
        plen = struct.unpack('!Q', base[12:20])[0] + rng.choice([-8, -1, 1, 8, 2 ** 40, 2 ** 63])
        return base[:8] + struct.pack('!IQ', max(hlen, 0), max(plen, 0)) + base[20:]
    js = rng.choice(NASTY_HEADERS)
    if b'%d' in js:
        big = [rng.choice([2 ** 63, 2 ** 64 + 1, 2 ** 31, 3, 0]) for _ in range(js.count(b'%d'))]
        js = js % tuple(big)
    plen = rng.choice([0, 8, 64, 2 ** 20])
    return fixed(rng.randrange(1, 11), len(js), plen) + js + rng.randbytes(min(plen, rng.randrange(80)))


def test_fuzzed_frames_never_crash_and_never_allocate_beyond_the_bound():
    """100,000 seeded malformed frames: each is a frame or a ProtocolError, nothing else (no RecursionError, no
    ValueError from reshape); on a sample, peak memory stays within the frame bound (64 KB here) plus O(bytes
    received), even when a header claims 2**63 bytes.  Prints the count and the time (-s shows it)."""
    import random
    import time
    rng = random.Random(15)
    if not hasattr(rng, 'randbytes'):  # Python < 3.9
        rng.randbytes = lambda n: bytes(rng.getrandbits(8) for _ in range(n))
    valid = [P.frame_bytes('reply', {'id': 1, 'result': {'a': [1, 2]}},
                           [('x', np.ones((4, 4), np.float32)), ('m', np.zeros(3, np.uint8))]),
             P.frame_bytes('features', {'batch': 2}, [('x', np.zeros((2, 0, 3), np.float16))]),
             P.frame_bytes('hello', {'nonce': P.make_nonce(), 'deep': [[[[1]]]]})]
    n, decoded, crashes = 100_000, 0, []
    t0 = time.perf_counter()
    for i in range(n):
        data = fuzz_case(rng, valid)
        try:
            P.decode_frame(data, SMALL)
            decoded += 1
        except P.ProtocolError:
            pass
        except Exception as e:  # noqa: BLE001 - exactly what the test is looking for
            crashes.append((i, repr(e)[:120], data[:60]))
    elapsed = time.perf_counter() - t0
    print(f'\nfuzz: {n} frames in {elapsed:.1f} s, {decoded} decoded, {len(crashes)} crashes')
    assert not crashes, crashes[:5]
    assert 0 < decoded < n / 2  # the fuzzer reached both the error paths and the success path
    tracemalloc.start()
    try:
        for _ in range(2000):
            data = fuzz_case(rng, valid)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                P.decode_frame(data, SMALL)
            except P.ProtocolError:
                pass
            # what a frame may claim is never allocated; what arrived costs O(its length) (the depth scan)
            assert tracemalloc.get_traced_memory()[1] - base < SMALL.max_frame_bytes + 64 * len(data) + 16384
    finally:
        tracemalloc.stop()


def test_json_depth_and_zero_dimension_shapes_are_refused_as_protocol_errors():
    with pytest.raises(P.ProtocolError, match='nests deeper than 4 levels'):
        P.decode_frame(framed(b'{"a":[[[[[1]]]]]}'), SMALL)
    assert P.decode_frame(framed(b'{"a":"[[[[[[[[[[[[[["}'), SMALL).header == {'a': '[' * 14}  # inside a string
    with pytest.raises(P.ProtocolError, match='dimension 9223372036854775808'):
        P.decode_frame(framed(tensor_js(shape='[0, 9223372036854775808]')), SMALL)
    with pytest.raises(P.ProtocolError, match='not a JSON number'):
        P.decode_frame(framed(b'{"x": NaN}'), SMALL)
    assert P.json_depth(b'{"a":[{"b":"}}}]]]"}]}') == 3


def test_fixed_header_layout_is_20_bytes_network_order():
    raw = P.frame_bytes('bye', {})
    assert raw[:4] == b'HRVG' and len(P.FIXED.pack(b'HRVG', 1, 9, 0, 2, 0)) == 20
    assert struct.unpack('!4sBBHIQ', raw[:20]) == (b'HRVG', P.VERSION, P.MESSAGE_TYPES['bye'], 0, 2, 0)


def test_proofs_cover_the_role_and_both_nonces_of_one_connection():
    ns, nw = P.make_nonce(), P.make_nonce()
    mac = P.auth_proof('secret', 'worker', ns, nw)
    assert P.check_proof('secret', 'worker', ns, nw, mac)
    assert not P.check_proof('wrong', 'worker', ns, nw, mac)
    assert not P.check_proof('secret', 'server', ns, nw, mac)  # a worker's proof is no server's proof
    assert not P.check_proof('secret', 'worker', P.make_nonce(), nw, mac)  # another connection's server nonce
    assert not P.check_proof('secret', 'worker', ns, P.make_nonce(), mac)  # another connection's worker nonce
    assert not P.check_proof('secret', 'worker', ns, nw, None)
    assert not P.check_proof('secret', 'worker', ns, nw, 'é' * 64)
    assert P.check_nonce(ns, 'peer') == ns
    for bad in ('é' * 64, 'AB' * 32, None, 5, ns[:-1]):
        with pytest.raises(P.ProtocolError, match='malformed nonce'):
            P.check_nonce(bad, 'peer')


@pytest.mark.network
def test_secure_channel_refuses_injected_altered_and_replayed_frames():
    """After the handshake every frame carries a MAC over direction, counter and bytes: a relay in the middle
    can pass frames on but not inject, alter, replay or reflect one."""
    key = P.session_key('secret', P.make_nonce(), P.make_nonce())
    pairs = []

    def pair():
        a, b = socket.socketpair()
        a.settimeout(5)
        b.settimeout(5)
        pairs.append((a, b))
        return a, b, P.SecureChannel(a, key, 'server'), P.SecureChannel(b, key, 'worker')

    try:
        a, b, server, worker = pair()
        P.send_frame(server, 'request', {'cmd': 'ping', 'id': 1}, [('x', np.arange(3, dtype=np.int64))])
        f = P.recv_frame(worker)
        assert f.header == {'cmd': 'ping', 'id': 1} and f.tensors['x'].tolist() == [0, 1, 2]
        recorded = b''.join(bytes(p) for p in P.encode_frame('request', {'cmd': 'ping', 'id': 2}, None, P.FLAG_MAC))
        sealed = recorded + server.tag('server', 2, [recorded])
        a.sendall(sealed)  # exactly what the server would send next: accepted
        assert P.recv_frame(worker).header['id'] == 2
        a.sendall(sealed)  # the same bytes again: a replay
        with pytest.raises(P.ProtocolError, match='fails its MAC check'):
            P.recv_frame(worker)
        a, b, server, worker = pair()
        altered = bytearray(sealed)
        altered[-40] ^= 1
        a.sendall(bytes(altered))
        with pytest.raises(P.ProtocolError, match='fails its MAC check'):
            P.recv_frame(worker)
        a, b, server, worker = pair()
        a.sendall(P.frame_bytes('request', {'cmd': 'ping', 'id': 3}))  # injected without a MAC
        with pytest.raises(P.ProtocolError, match='carries a MAC'):
            P.recv_frame(worker)
        a, b, server, worker = pair()
        P.send_frame(P.SecureChannel(a, P.session_key('guess', P.make_nonce(), P.make_nonce()), 'server'),
                     'request', {'cmd': 'ping'})  # injected with a key of another session
        with pytest.raises(P.ProtocolError, match='fails its MAC check'):
            P.recv_frame(worker)
        a, b, server, worker = pair()
        P.send_frame(worker, 'reply', {'id': 1})  # reflected: the worker's own frame sent back to it
        a.sendall(a.recv(65536))
        with pytest.raises(P.ProtocolError, match='fails its MAC check'):
            P.recv_frame(worker)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_token_from_flag_or_environment(monkeypatch):
    monkeypatch.delenv(P.TOKEN_ENV, raising=False)
    assert P.resolve_token(None) is None
    monkeypatch.setenv(P.TOKEN_ENV, 'from-env')
    assert P.resolve_token(None) == 'from-env'
    assert P.resolve_token('flag') == 'flag'
