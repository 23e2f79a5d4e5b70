"""The one local search of steps 2 and 3 (optim/search.py): move limit, pair moves, and no move without improvement."""
import numpy as np

from optim.search import local_search

ALLOWED = np.zeros((2, 14), dtype=bool)
ALLOWED[:, [0, 1]] = True  # two blocks, layouts 0 and 1 each


def _improve_by(score):
    """`improve` that takes the lowest strictly better score (ties: the first candidate)."""
    def improve(cand, cl, g, lam):
        s = np.array([score(c, int(x)) for c, x in zip(cand, cl)])
        i = int(np.argmin(s))
        return i if s[i] < score(g, lam) else None
    return improve


def test_single_moves_stop_at_a_local_optimum_that_pair_moves_leave():
    # (1, 1) is best, but from (0, 0) changing either block alone makes things worse
    table = {(0, 0): 1.0, (0, 1): 2.0, (1, 0): 2.0, (1, 1): 0.0}
    improve = _improve_by(lambda g, lam: table[tuple(int(x) for x in g)] + (lam != 0))
    g, lam, moves, status = local_search(np.array([0, 0]), 0, ALLOWED, improve)
    assert (g.tolist(), lam, moves, status) == ([0, 0], 0, 0, 'converged')
    g, lam, moves, status = local_search(np.array([0, 0]), 0, ALLOWED, improve, pair_moves=True)
    assert (g.tolist(), lam, moves, status) == ([1, 1], 0, 1, 'converged')


def test_move_limit_and_input_left_unchanged():
    improve = _improve_by(lambda g, lam: -float(g.sum()) - lam)  # higher is better: 3 moves to ([1, 1], 2)
    start = np.array([0, 0])
    g, lam, moves, status = local_search(start, 0, ALLOWED, improve, max_moves=2)
    assert (moves, status) == (2, 'move_limit') and start.tolist() == [0, 0]
    g, lam, moves, status = local_search(start, 0, ALLOWED, improve)
    assert (g.tolist(), lam, moves, status) == ([1, 1], 2, 3, 'converged')
