#!/usr/bin/env python3
"""Deliberative explanations (Wang & Vasconcelos, NeurIPS 2019): the paper's comparisons on CUB-200 or ADE20K.

Two comparisons, as in the paper (and the released code's ``insecurity_*`` scripts): the difficulty scores
(hardness predictor ``hp``, confidence ``cs``, ``entropy``) with gradient attribution maps, and the attribution
maps (``gradient``, ``ig``, ``2ndg``) with the hardness predictor. Each setting is one resumable
``fastig deliberate`` run over the ``--hard`` most difficult test images (OUT/<difficulty>-<attribution>/).

Writes OUT/table.md (one row per setting: the area under the mean precision-recall curve, the mean precision and
recall over the mask fractions r, and for ADE20K the mean IoU) and OUT/scores.png, OUT/attributions.png
(precision-recall curves of each comparison). With random weights (``--weights none``) the numbers check the
pipeline only.

    python scripts/deliberative.py --dataset CUB_200_2011/ --model vgg16 --weights cub_vgg16.pth \\
        --layer features.29 --hardness hp.pt --hard 100 --out deliberative/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/deliberative.py` from a checkout without installing
    sys.path.insert(0, str(ROOT))

from fastig.core import progress  # noqa: E402
from fastig.deliberative.run import Settings, run  # noqa: E402
from fastig.metrics.plots import save_curve_plot  # noqa: E402

COMPARISONS = {
    "scores": [("hp", "gradient"), ("cs", "gradient"), ("entropy", "gradient")],
    "attributions": [("hp", "gradient"), ("hp", "ig"), ("hp", "2ndg")],
}


SETTINGS = list(dict.fromkeys(pair for pairs in COMPARISONS.values() for pair in pairs))  # hp/gradient once

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", type=Path, required=True, help="CUB-200-2011 or ADE20K root")
    p.add_argument("--model", default="vgg16", help="architecture (`fastig models`)")
    p.add_argument("--weights", default="none", help="the classifier's checkpoint, or none (random, seeded)")
    p.add_argument("--layer", default="features.29", help="layer of the maps (VGG16's conv5_3 ReLU by default)")
    p.add_argument("--hardness", default="none", help="hardness predictor checkpoint, or none (random, seeded)")
    p.add_argument("--hard", type=int, default=100, help="hard test images per setting")
    p.add_argument("--ig-steps", type=int, default=50)
    p.add_argument("--input-size", type=int, default=None, help="resize/crop size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pictures", type=int, default=5, help="pictures per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    args = p.parse_args(argv)

    summaries = {}
    with progress.task("deliberative settings", total=len(SETTINGS), unit="settings", show=True) as task:
        for difficulty, attribution in SETTINGS:
            settings = Settings(model=args.model, layer=args.layer, dataset=str(args.dataset), weights=args.weights,
                                attribution=attribution, difficulty=difficulty, hardness=args.hardness,
                                hard=args.hard, ig_steps=args.ig_steps, input_size=args.input_size,
                                batch_size=args.batch_size, seed=args.seed, pictures=args.pictures,
                                device=args.device)
            summaries[difficulty, attribution] = run(settings, args.out / f"{difficulty}-{attribution}",
                                                     overwrite=args.overwrite, show_progress=False)
            task.advance()

    with_iou = any("mean_iou" in s.areas for s in summaries.values())
    header = ["difficulty", "attribution", "hard images", "PR AUC", "mean precision", "mean recall"]
    header += ["mean IoU"] if with_iou else []
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (difficulty, attribution), s in summaries.items():
        row = [difficulty, attribution, str(s.hard_images)] + [
            f"{s.areas.get(k, float('nan')):.4f}" for k in ("precision_recall", "mean_precision", "mean_recall")]
        row += [f"{s.areas['mean_iou']:.4f}"] if with_iou else []
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    print(table, end="")
    for name, pairs in COMPARISONS.items():
        series = {f"{d}/{a}": (summaries[d, a].curves["recall"], summaries[d, a].curves["precision"]) for d, a in pairs}
        save_curve_plot(args.out / f"{name}.png", series, title=f"{args.model} {args.layer}: {name}",
                        xlabel="recall", ylabel="precision", ylim=(0.0, 1.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
