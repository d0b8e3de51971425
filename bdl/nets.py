"""Small network builders used by the estimators and examples."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from bdl.core.validation import check_int


def make_mlp(in_features: int, hidden_sizes: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """ReLU multilayer perceptron that ends in its last hidden activation (a feature extractor).

    Parameters
    ----------
    in_features : int
        Input width.
    hidden_sizes : sequence of int
        Width of each hidden layer; an empty sequence gives the identity (features = inputs).
    dropout : float
        Dropout probability after each hidden activation.

    Returns
    -------
    nn.Sequential
        Maps (..., in_features) to (..., hidden_sizes[-1]) (or to (..., in_features)).
    """
    check_int("in_features", in_features)
    layers: list[nn.Module] = []
    width = in_features
    for i, h in enumerate(hidden_sizes):
        check_int(f"hidden_sizes[{i}]", h)
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    return nn.Sequential(*layers)
