"""comm.protocol: frame round trips of every message, malformed and truncated frames, a fuzzed decoder, the HMAC."""
import socket
import struct
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from comm import protocol as P

SMALL = P.Limits(max_frame_bytes=64 * 1024, max_header_bytes=8 * 1024, max_tensors=16, max_dims=4)


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
    (fixed(flags=1) + b'{}', 'unknown flags'),
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


def test_fuzzed_frames_never_crash_and_never_allocate_beyond_the_bound():
    """Random bytes, random valid-magic headers and bit flips of valid frames: ProtocolError or a frame, nothing
    else, and peak memory stays within the frame bound (64 KB here) even when a header claims 2**60 bytes."""
    rng = np.random.default_rng(1234)
    valid = P.frame_bytes('reply', {'id': 1, 'result': {'a': [1, 2]}},
                          [('x', np.ones((4, 4), np.float32)), ('m', np.zeros(3, np.uint8))])
    cases = []
    for _ in range(300):
        cases.append(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes())
        hlen, plen = int(rng.integers(0, 2 ** 32)), int(rng.integers(0, 2 ** 62))
        cases.append(fixed(int(rng.integers(1, 10)), hlen, plen) + rng.bytes(int(rng.integers(0, 100))))
        flipped = bytearray(valid)
        for _ in range(int(rng.integers(1, 4))):
            flipped[int(rng.integers(0, len(flipped)))] ^= 1 << int(rng.integers(0, 8))
        cases.append(bytes(flipped))
        cases.append(valid[:int(rng.integers(0, len(valid)))] + rng.bytes(int(rng.integers(0, 64))))
    decoded = 0
    tracemalloc.start()
    try:
        for data in cases:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                P.decode_frame(data, SMALL)
                decoded += 1
            except P.ProtocolError:
                pass
            assert tracemalloc.get_traced_memory()[1] - base < SMALL.max_frame_bytes + 2 * len(data) + 16384
    finally:
        tracemalloc.stop()
    assert decoded < len(cases)  # the fuzzer did reach the error paths


def test_fixed_header_layout_is_20_bytes_network_order():
    raw = P.frame_bytes('bye', {})
    assert raw[:4] == b'HRVG' and len(P.FIXED.pack(b'HRVG', 1, 9, 0, 2, 0)) == 20
    assert struct.unpack('!4sBBHIQ', raw[:20]) == (b'HRVG', 1, P.MESSAGE_TYPES['bye'], 0, 2, 0)


def test_hmac_challenge_response():
    nonce = P.make_nonce()
    mac = P.auth_mac('secret', nonce, 'worker')
    assert P.check_mac('secret', nonce, 'worker', mac)
    assert not P.check_mac('wrong', nonce, 'worker', mac)
    assert not P.check_mac('secret', nonce, 'server', mac)  # a worker answer is no server answer
    assert not P.check_mac('secret', P.make_nonce(), 'worker', mac)
    assert not P.check_mac('secret', nonce, 'worker', None)


def test_token_from_flag_or_environment(monkeypatch):
    monkeypatch.delenv(P.TOKEN_ENV, raising=False)
    assert P.resolve_token(None) is None
    monkeypatch.setenv(P.TOKEN_ENV, 'from-env')
    assert P.resolve_token(None) == 'from-env'
    assert P.resolve_token('flag') == 'flag'
