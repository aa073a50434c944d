"""Independent references the tests compare the code with, written plainly in float64 numpy."""

import numpy as np


def naive_greedy(points, n_select, start, first_from=None):
    """Alg. 1 written plainly: each step recomputes every point's distance to every chosen center.
    first_from = (rows, count): the picks before the count-th are taken among those rows only."""
    points = points.astype(np.float64)
    selected = [start]
    while len(selected) < n_select:
        d = np.min([((points - points[c]) ** 2).sum(1) for c in selected], axis=0)
        if first_from is not None and len(selected) < first_from[1]:  # only these rows may be picked yet
            d = np.where(np.isin(np.arange(len(points)), first_from[0]), d, -1.0)
        selected.append(int(np.argmax(d)))
    return selected
