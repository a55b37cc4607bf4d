"""Makes docs/images/deliberative_toy.png: insecurity maps of the toy model of tests/test_deliberative.py, whose
classes A and B share the middle region of the image (run from the repository root)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import numpy as np, torch
from test_deliberative import SharedRegionNet
from fastig.deliberative import HardnessPredictor, InsecurityMaps
from fastig.deliberative.pictures import hard_image_picture, save_png
from fastig.io.cub200 import PartTable

shared, only_a, only_b = [14, 15, 20, 21], [0, 1, 6, 7], [28, 29, 34, 35]
torch.manual_seed(0)
model = SharedRegionNet(shared, only_a, only_b).eval()
x = torch.full((1, 1, 12, 12), 0.2)
cells = x[0, 0].reshape(6, 2, 6, 2)
for cell, value in [(c, 1.0) for c in shared] + [(c, 3.0) for c in only_a + only_b]:
    cells[cell // 6, :, cell % 6, :] = value
head = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Sigmoid(), torch.nn.Flatten(0))
torch.nn.init.constant_(head[0].weight, 0.1)
hp = HardnessPredictor(model, head).eval()
result = InsecurityMaps(model, "act", attribution="2ndg", difficulty="hp", hardness_predictor=hp, top_k=4).attribute(x)[0]
names = {0: "class A", 1: "class B", 2: "class C", 3: "class D"}
# "parts": the centers of the three regions; A and B share the middle one
xy = np.array([[5, 5], [1, 1], [9, 9]])  # (x, y) input pixels
table = PartTable(np.zeros((4, 4, 3), bool)); table.table[0, 1, 0] = table.table[1, 0, 0] = True
table.table[0, 2, 1] = table.table[2, 0, 1] = True
gray = (x[0, 0] / x.max() * 255).round().byte().numpy()
image = np.repeat(gray[:, :, None], 3, 2)
masks = result.masks(0.1)
ambiguities = []
for p in result.strongest(3):
    a, b = result.pair_ranks[p].tolist()
    ca, cb = int(result.classes[a]), int(result.classes[b])
    ambiguities.append(dict(names=(names[ca], names[cb]), probabilities=(float(result.probabilities[a]), float(result.probabilities[b])),
                            map=result.maps[p].numpy(), mask=masks[p].numpy(), shared=table.shared(ca, cb)))
title = f"toy model: A and B share the middle region; 2ndG + hp, difficulty {result.difficulty:.2f}"
picture = hard_image_picture(image, title, ambiguities, 0.1, parts=(xy, np.ones(3, bool)), scale=16)
save_png(ROOT / 'docs' / 'images' / 'deliberative_toy.png', picture)
