"""PAIR saliency's Guided IG on this NumPy (import: ``from _pair import NumpyWithQuantileInterpolation``).

The one copy for the tests, the benchmarks and scripts/gpu_check.py (the last two put tests/ on ``sys.path``).
"""

import types

import numpy as np


class NumpyWithQuantileInterpolation(types.ModuleType):
    """numpy, except that ``quantile(..., interpolation=...)`` (removed in NumPy 2.4) is passed on as ``method=``,
    its documented replacement with the same meaning, so PAIR's unmodified Guided IG runs: set it as the ``np`` of
    ``saliency.core.guided_ig``."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def quantile(a, q, *args, interpolation=None, **kwargs):
        if interpolation is not None:
            kwargs["method"] = interpolation
        return np.quantile(a, q, *args, **kwargs)
