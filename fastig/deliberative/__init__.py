"""Deliberative explanations (Wang & Vasconcelos, NeurIPS 2019): insecurity maps of ambiguous class pairs weighted
by a difficulty score, the hardness predictor, and their evaluation on CUB-200-2011 and ADE20K.

>>> from fastig.deliberative import InsecurityMaps
>>> maps = InsecurityMaps(model, "features.42", attribution="2ndg", difficulty="cs")
>>> result = maps.attribute(images)[0]      # result.pairs, result.maps, result.difficulty
"""

from fastig.deliberative.hardness import HardnessPredictor, load_hardness, save_hardness, train_hardness
from fastig.deliberative.insecurity import (ATTRIBUTIONS, DIFFICULTIES, Insecurities, InsecurityMaps,
                                            ambiguous_pairs, confidence_difficulty, entropy_difficulty,
                                            top_fraction_mask)

__all__ = ["InsecurityMaps", "Insecurities", "HardnessPredictor", "train_hardness", "load_hardness", "save_hardness",
           "ambiguous_pairs", "top_fraction_mask", "confidence_difficulty", "entropy_difficulty", "ATTRIBUTIONS",
           "DIFFICULTIES"]
