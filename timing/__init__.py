"""Timing inputs of the cost model: closed-form FLOPs/bytes (`flops`), LUT measurement (`measure`), device
profiles (`profiles`) and LUT I/O, validation and cost tables (`lut`).

This package file stays importable on the device (Python 3.6): the worker imports timing.measure.
"""
