"""Attribution methods. Captum-named classes are drop-ins with Captum's signatures, defaults and numbers."""

from fastig.attr.integrated_gradients import IntegratedGradients
from fastig.attr.guided_ig import GuidedIntegratedGradients
from fastig.attr.blur_ig import BlurIntegratedGradients
from fastig.attr.latent_ig import LatentIntegratedGradients
from fastig.attr.gradients import GradientShap, InputXGradient, Saliency
from fastig.attr.noise_tunnel import NoiseTunnel
from fastig.attr.guided import Deconvolution, GuidedBackprop, GuidedNonLinearityIG
from fastig.attr.second_order import SecondOrderGradients

from fastig.attr.perturbation import FeatureAblation, FeaturePermutation, Occlusion, ShapleyValueSampling
from fastig.attr.surrogate import KernelShap, Lime
from fastig.attr.meaningful_perturbation import MeaningfulPerturbation
from fastig.attr.prediction_difference import PredictionDifferenceAnalysis
from fastig.attr.deeplift import DeepLift, DeepLiftShap
from fastig.attr.lrp import LRP
from fastig.attr.layer import (GuidedGradCam, LayerActivation, LayerGradCam, LayerGradientXActivation,
                               LayerIntegratedGradients)

__all__ = ["IntegratedGradients", "GuidedIntegratedGradients", "BlurIntegratedGradients", "LatentIntegratedGradients", "Saliency", "InputXGradient", "GradientShap", "NoiseTunnel", "GuidedBackprop", "Deconvolution",
           "GuidedNonLinearityIG", "SecondOrderGradients",
           "Occlusion", "FeatureAblation", "FeaturePermutation", "ShapleyValueSampling", "Lime", "KernelShap",
           "MeaningfulPerturbation", "PredictionDifferenceAnalysis", "DeepLift", "DeepLiftShap", "LRP",
           "LayerActivation", "LayerGradientXActivation", "LayerGradCam", "LayerIntegratedGradients", "GuidedGradCam"]
