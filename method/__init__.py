"""The parts of PatchCore that patchcore.py puts together: the backbone's features, the greedy coreset, the exact
nearest-neighbour search, the map's blur, the released code's feature steps, the decision thresholds, and the
published runs' settings as presets.
"""
