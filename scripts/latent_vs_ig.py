#!/usr/bin/env python3
"""The latent-IG thesis: IG vs latent IG (lerp, slerp) vs segment and inpainting baselines on Places365.

The scene classifier is SASceneNet's RGB branch (`sascenenet_rgb`: the whole scene squashed to 256x256, then the
224 center crop; see fastig.io.places365), explaining each image's top-1 class with:

- IG from the black (zero) baseline;
- IG from segment baselines: the image with half of its superpixels blurred away, or removed and inpainted
  (Telea), averaged over `--baseline-samples` seeded draws per image (fastig.core.baselines);
- latent IG through the DALL-E dVAE, interpolating the latents by lerp and by slerp (great circles).

Each is one resumable `fastig attribute` run scored with insertion and deletion (`fastig evaluate`). Then the
numerical stability of the integral (completeness |delta| and the scores vs the number of steps, for IG and latent
IG lerp/slerp; fastig.metrics.stability_table) and the difference between the explanations with different
baselines (rank correlation and top-10% overlap; fastig.metrics.baseline_sensitivity) on the first images.

Writes OUT/latent_vs_ig.{md,csv} (per variant: images, insertion, deletion), OUT/latent_vs_ig_images.csv (per
image: label and predicted class names, scores), OUT/latent_vs_ig_maps.png (images and maps, rows labelled with
class names), OUT/stability.{md,csv} and plots, OUT/sensitivity/ (tables, HDF5, plots). Without --dataset: a
miniature Places365 tree (val_256, places365_val.txt, categories_places365.txt) and a miniature random dVAE, with
random weights.

    python scripts/latent_vs_ig.py --out thesis/                                          # miniature
    python scripts/latent_vs_ig.py --dataset places365/ --dvae checkpoints/ --size 100 --stride 365 --out thesis/
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import _study

VARIANTS = {  # name -> (label, method, options); the dVAE folder is added to latent IG
    "ig": ("IG (zeros)", "ig", {}),
    "ig_segments_blur": ("IG (segments, blur)", "ig", {"baselines": "segments", "baseline_fill": "blur"}),
    "ig_segments_telea": ("IG (segments, Telea)", "ig", {"baselines": "segments", "baseline_fill": "telea"}),
    "latent_lerp": ("latent IG (lerp)", "latent_ig", {"interpolation": "lerp"}),
    "latent_slerp": ("latent IG (slerp)", "latent_ig", {"interpolation": "slerp"}),
}
STABLE = ("ig", "latent_lerp", "latent_slerp")  # the variants of the stability table (those that are run)


def miniature(folder: Path, n: int, dvae_folder: Path) -> Path:
    """A Places365-layout miniature (random labels over 365 placeholder class names) and a small random dVAE."""
    import cv2
    import torch

    from fastig.models.dvae import DECODER_FILE, ENCODER_FILE, Decoder, Encoder

    rng = np.random.default_rng(0)
    (folder / "val_256").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(1, n + 1):
        name = f"Places365_val_{k:08d}.jpg"
        cv2.imwrite(str(folder / "val_256" / name), _study.scene(rng, 256, 256)[:, :, ::-1])
        lines.append(f"{name} {int(rng.integers(0, 365))}")
    (folder / "places365_val.txt").write_text("\n".join(lines) + "\n")
    (folder / "categories_places365.txt").write_text("".join(f"/m/miniature_scene_{i:03d} {i}\n" for i in range(365)))
    dvae_folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    encoder = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=64)
    decoder = Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=64)
    with torch.no_grad():  # sharper codes and more contrast than the plain random init, so that the latent path
        for net in (encoder, decoder):  # moves and lerp and slerp differ (a random decoder gives one grey image)
            net.blocks.output.conv.w.mul_(10)
            for p in net.parameters():
                if p.dim() == 1:
                    p.normal_(std=0.2)
    torch.save(encoder.state_dict(), dvae_folder / ENCODER_FILE)
    torch.save(decoder.state_dict(), dvae_folder / DECODER_FILE)
    return folder


def main(argv=None):
    p = _study.parser(__doc__.split("\n\n")[0], "sascenenet_rgb", 2)
    p.add_argument("--dvae", type=Path, default=None, help="folder of dvae_encoder.pt/dvae_decoder.pt "
                                                           "(`fastig fetch-weights dvae`; default: checkpoints)")
    p.add_argument("--steps", type=int, default=None, help="path steps (default 32; miniature 8)")
    p.add_argument("--baseline-samples", type=int, default=4, help="segment baselines drawn per image")
    p.add_argument("--stability-steps", default=None, help="steps of the stability table (default 8,16,32,64; "
                                                          "miniature 2,4,8)")
    p.add_argument("--stability-images", type=int, default=2, help="images of the stability and sensitivity parts")
    p.add_argument("--variants", default=",".join(VARIANTS), help="which of the variants to run (the first is "
                                                                  "the reference of the sensitivity part)")
    p.add_argument("--metric-step", type=int, default=224 * 224 // 32,
                   help="insertion/deletion: pixels per step (default: 1/32 of the image)")
    args = p.parse_args(argv)
    dataset, dvae = args.dataset, args.dvae
    if dataset is None:
        dvae = args.out / "miniature" / "dvae"
        dataset = miniature(args.out / "miniature" / "places365", _study.end_of(args), dvae)
    steps = args.steps or (32 if args.dataset is not None else 8)
    stability_steps = _study.csv_list(args.stability_steps or ("8,16,32,64" if args.dataset is not None else "2,4,8"),
                                      int)
    (model_name,) = _study.csv_list(args.models)
    from fastig.core import progress
    from fastig.io.datasets import open_dataset
    from fastig.io.tables import write_table

    classes = open_dataset(dataset, args.layout if args.dataset is not None else "auto", args.labels).classes
    chosen = _study.csv_list(args.variants)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or len(chosen) < 2:
        p.error(f"give two or more of the variants {', '.join(VARIANTS)}; got {args.variants}")
    variants = {VARIANTS[v][0]: (VARIANTS[v][1], {
        **VARIANTS[v][2], "n_steps": steps,
        **({"dvae": str(dvae)} if VARIANTS[v][1] == "latent_ig" and dvae is not None else {}),
        **({"baseline_samples": args.baseline_samples} if "baselines" in VARIANTS[v][2] else {})}) for v in chosen}
    stable = [VARIANTS[v][0] for v in STABLE if v in chosen]
    results, stores = {}, {}
    with progress.task("latent IG vs IG", len(variants) + 2, "parts", show=True) as task:
        for label, (method, options) in variants.items():
            folder = args.out / "runs" / label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
            stores[label] = _study.attribute(folder, args, model_name, method, options, dataset)
            results[label] = _study.evaluate(stores[label], ["insertion", "deletion"], args, step=args.metric_step)
            task.advance()
        rows = [{"variant": label, "images": int(v["done"].sum()), "insertion": _study.mean(v["insertion"], v["done"]),
                 "deletion": _study.mean(v["deletion"], v["done"])} for label, v in results.items()]
        written = list(write_table(rows, args.out / "latent_vs_ig",
                                   title=f"{model_name}: insertion (higher is better) and deletion (lower is better)"))
        written.append(per_image(results, classes, args.out / "latent_vs_ig_images.csv"))
        model, inputs, pictures, targets, ids = first_images(next(iter(stores.values())), model_name, args)
        written.append(maps_picture(stores, pictures, targets, classes, args.out / "latent_vs_ig_maps.png"))
        written += stability(model, inputs, targets, {v: variants[v] for v in stable}, stability_steps, args)
        task.advance()
        written += sensitivity(stores, pictures, targets, ids, classes, args)
        task.advance()
    for path in written:
        print(path)
    return rows


def per_image(results, classes, path: Path) -> Path:
    import csv

    first = next(iter(results.values()))

    def names(i):
        return classes[int(i)] if classes is not None and 0 <= int(i) < len(classes) else str(int(i))

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        scores = [f"{v} {m}" for v in results for m in ("insertion", "deletion")]
        writer.writerow(["image", "label", "predicted"] + scores)
        for row in np.flatnonzero(first["done"]):
            label = first["labels"][row]
            writer.writerow([first["ids"][row], names(label) if label >= 0 else "", names(first["predictions"][row])]
                            + [f"{results[v][m][row]:.6g}" for v in results for m in ("insertion", "deletion")])
    return path


def first_images(store: Path, model_name: str, args):
    """The model, the first images' inputs, their display pictures, targets and ids (as the runs saw them)."""
    import torch

    from fastig.io.images import read_image
    from fastig.run import preprocess_for

    values = _study.read_store(store)
    rows = np.flatnonzero(values["done"])[:args.stability_images]
    pre = preprocess_for(model_name)
    inputs = torch.stack([pre(read_image(values["paths"][r])) for r in rows])
    model = _study.loaded(model_name, args)
    pictures = [pre.to_display(x) for x in inputs]
    return model, inputs.to(args.device), pictures, torch.as_tensor(values["targets"][rows]), \
        [str(values["ids"][r]) for r in rows]


def maps_picture(stores, pictures, targets, classes, path: Path) -> Path:
    from fastig.io.heatmap import grid, render_heatmap, save_png
    from fastig.io.store import Store

    maps = {}
    for label, store in stores.items():
        with Store.open(store) as s:
            maps[label] = s.attributions()[s.done_indices()[:len(pictures)]]
    rows = [[picture] + [render_heatmap(maps[v][i].astype(np.float64), picture) for v in stores]
            for i, picture in enumerate(pictures)]
    labels = [classes[int(t)] if classes is not None else f"class {int(t)}" for t in targets]
    return save_png(path, grid(rows, row_labels=labels, col_labels=["image"] + list(stores)))


def stability(model, inputs, targets, variants, steps, args) -> list[Path]:
    from fastig.metrics import stability_table

    table = stability_table(model, inputs, targets.to(inputs.device),
                            {label: (method, {k: v for k, v in options.items() if k != "n_steps"})
                             for label, (method, options) in variants.items()}, steps=steps,
                            metric_options={"step": args.metric_step})
    return table.save(args.out / "stability", title="Numerical stability of IG and latent IG")


def sensitivity(stores, pictures, targets, ids, classes, args) -> list[Path]:
    """Rank correlation and top-10% overlap between the maps of the variants on the same images."""
    import itertools

    from fastig.io.store import Store
    from fastig.metrics.sensitivity import SensitivityResult, rank_correlation, top_k_overlap

    maps = {}
    for label, store in stores.items():
        with Store.open(store) as s:
            maps[label] = s.attributions()[s.done_indices()[:len(pictures)]].astype(np.float64)
    first = next(iter(stores))
    pairs = [(first, other) for other in stores if other != first] + \
        [p for p in itertools.combinations(stores, 2) if p[0] != first][:1]
    result = SensitivityResult(list(stores), maps, {p: rank_correlation(maps[p[0]], maps[p[1]]) for p in pairs},
                               {p: top_k_overlap(maps[p[0]], maps[p[1]], 0.1) for p in pairs}, 0.1,
                               targets.numpy(), {"method": "IG vs latent IG",
                                                 "stores": {k: str(v) for k, v in stores.items()}})
    return result.save(args.out / "sensitivity", images=pictures, ids=ids, class_names=classes)


if __name__ == "__main__":
    main()
