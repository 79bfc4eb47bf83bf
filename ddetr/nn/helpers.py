"""Two small helpers of both transformers (dense and deformable) and the detectors."""
import copy

from torch import nn


def get_clones(module, n):
    """n independent deep copies of module, in a ModuleList."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def with_pos(x, pos):
    """x + pos, or x when there is no position code (pos is None)."""
    return x if pos is None else x + pos
