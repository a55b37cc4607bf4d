"""Attribution methods. Captum-named classes are drop-ins with Captum's signatures, defaults and numbers."""

from fastig.attr.integrated_gradients import IntegratedGradients

__all__ = ["IntegratedGradients"]
