"""Real mode: the wire protocol (device-side, Python 3.6), the server session and a link emulator (server-side).

This package file stays importable on the device: client_worker.py imports comm.protocol.
"""
