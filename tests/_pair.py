"""What running PAIR saliency (the reference of Guided IG and Blur IG) takes: its NumPy 2.4 shim and the model
function a PAIR user writes for a torch model (import: ``from _pair import ...``).

The one copy for the tests, the benchmarks and scripts/gpu_check.py (the last two put tests/ on ``sys.path``).
"""

import types

import numpy as np
import torch


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


def pair_model_function(model, target, output="logit", layout="chw"):
    """PAIR's ``call_model_function`` for a torch model: a numpy batch (``layout`` "chw": [B, C, H, W], or "hwc":
    [B, H, W, C] as PAIR's Blur IG passes images) in the model's dtype and device, the gradient of the target logit
    (``output="probability"``: of its softmax probability) out, in the same layout."""
    import saliency.core

    parameter = next(model.parameters())

    def call(x_batch, call_model_args=None, expected_keys=None):
        x = torch.as_tensor(np.asarray(x_batch), dtype=parameter.dtype, device=parameter.device)
        if layout == "hwc":
            x = x.permute(0, 3, 1, 2).contiguous()
        x.requires_grad_()
        out = model(x)
        if output == "probability":
            out = torch.softmax(out, 1)
        (grad,) = torch.autograd.grad(out[:, target].sum(), x)
        if layout == "hwc":
            grad = grad.permute(0, 2, 3, 1)
        return {saliency.core.INPUT_OUTPUT_GRADIENTS: grad.detach().cpu().numpy()}

    return call
