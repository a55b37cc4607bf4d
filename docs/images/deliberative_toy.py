"""Makes docs/images/deliberative_toy.png: insecurity maps of the toy model of tests/test_deliberative.py, whose
classes A and B share the middle region of the image (run from the repository root)."""

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_deliberative import shared_region_example  # noqa: E402

from fastig.deliberative import InsecurityMaps  # noqa: E402
from fastig.deliberative.pictures import hard_image_picture, save_png  # noqa: E402
from fastig.io.cub200 import PartTable  # noqa: E402

NAMES = ["class A", "class B", "class C", "class D"]
SHARED, ONLY_A, ONLY_B = [14, 15, 20, 21], [0, 1, 6, 7], [28, 29, 34, 35]  # cells of the 6x6 grid of 2x2 pixels
PARTS = np.array([[5, 5], [1, 1], [9, 9]])  # (x, y): one "part" in the middle of each region

torch.manual_seed(0)
model, x, hp = shared_region_example(SHARED, ONLY_A, ONLY_B)
result = InsecurityMaps(model, "act", attribution="2ndg", difficulty="hp", hardness_predictor=hp,
                        top_k=4).attribute(x)[0]
table = PartTable(np.zeros((4, 4, 3), bool))  # A and B share the middle part, A and C the corner of A
table.table[0, 1, 0] = table.table[1, 0, 0] = True
table.table[0, 2, 1] = table.table[2, 0, 1] = True

masks = result.masks(0.1)
ambiguities = []
for p in result.strongest(3):
    a, b = result.pair_ranks[p].tolist()
    ca, cb = int(result.classes[a]), int(result.classes[b])
    ambiguities.append(dict(names=(NAMES[ca], NAMES[cb]),
                            probabilities=(float(result.probabilities[a]), float(result.probabilities[b])),
                            map=result.maps[p].numpy(), mask=masks[p].numpy(), shared=table.shared(ca, cb)))
grey = (x[0, 0] / x.max() * 255).round().byte().numpy()
title = f"toy model: A and B share the middle region; 2ndG + hp, difficulty {result.difficulty:.2f}"
picture = hard_image_picture(np.repeat(grey[:, :, None], 3, 2), title, ambiguities, 0.1,
                             parts=(PARTS, np.ones(3, bool)), scale=16)
save_png(ROOT / "docs" / "images" / "deliberative_toy.png", picture)
