"""Entropy of attention weights: how spread out a query's attention is.

A row of attention weights is a probability distribution over the keys. Its entropy
is 0 when all weight sits on one key and log(n) when it is spread evenly over n keys,
so entropy / log(n) near 1 means "this query averages everything".
"""
import math



def attention_entropy(weights, dim=-1, eps=1e-12):
    """Shannon entropy (nats) of attention weights along ``dim`` (rows summing to 1).

    Args:
        weights: e.g. (N, M, Lq, S) from ``ddetr.ops.scaled_dot_product_attention``.

    Returns:
        the entropies, ``weights`` with ``dim`` removed.
    """
    w = weights.clamp_min(0)
    return -(w * (w + eps).log()).sum(dim)


def uniform_entropy(n):
    """log(n): the entropy of the uniform distribution over n keys, the maximum."""
    if n < 1:
        raise ValueError(f"n must be a positive number of keys, got {n}")
    return math.log(n)
