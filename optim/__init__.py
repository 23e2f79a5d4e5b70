"""Optimization library: LUT measurement and I/O, cost model, solvers.  Pure maths takes arrays.

This package file stays importable on the device (Python 3.6): the worker imports optim.measure.
"""
