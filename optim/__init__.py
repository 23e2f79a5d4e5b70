"""The pure solvers: the pipelined cost model (`cost`), the exact split/layout optimum (`exact`), the relaxed
gradient-descent solver (`relax`) and the step-3 goal program (`goal`).  They take arrays and tables as
arguments and import neither the configuration nor measurement, training or I/O code.
"""
