"""The ``fastig`` command line.

Every user error (an unknown model or method, a missing checkpoint, an unreadable image, a bad option) is printed
as one line, ``fastig: error: ...``, with exit code 2; tracebacks are left for bugs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

import fastig
from fastig import methods
from fastig.errors import FastigError


class _Group(click.Group):
    """A click group whose errors are one line each (exit code 2), never a traceback or a usage dump."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            code = super().main(args=args, prog_name=prog_name or "fastig", standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("fastig: aborted", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            click.echo(f"fastig: error: {exc.format_message()}", err=True)
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        except (FastigError, ValueError, TypeError) as exc:
            click.echo(f"fastig: error: {exc}", err=True)
            sys.exit(2)
        sys.exit(code or 0)


def _version_text() -> str:
    from fastig import ops

    backends = ", ".join(f"{op}={backend}" for op, backend in ops.backends().items())
    return f"fastig {fastig.__version__} (torch {torch.__version__}; ops: {backends})"


def _print_version(ctx, _param, value):
    if value and not ctx.resilient_parsing:
        click.echo(_version_text())
        ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and each op's backend, then exit.")
def cli():
    """fastig: fast Integrated-Gradients-family attributions for PyTorch image models.

    \b
    Quick start:
      fastig demo                       # the center-pixel sanity experiment, no downloads
      fastig attribute --model resnet50 --method ig --image cat.jpg --out results/
      fastig models / fastig methods    # what is available
    """


# --- attribute -----------------------------------------------------------------------------------------------


def _method_options(command):
    """Add one flag per option in the shared catalogue (fastig.methods.OPTIONS)."""
    for option in sorted(methods.OPTIONS.values(), key=lambda o: o.flag, reverse=True):
        if option.type is bool:
            flag = click.option(option.flag, option.kwarg, is_flag=True, default=None, help=option.help)
        elif isinstance(option.type, tuple):
            flag = click.option(option.flag, option.kwarg, type=click.Choice(option.type), default=None,
                                help=option.help)
        else:
            flag = click.option(option.flag, option.kwarg, type=option.type, default=None, help=option.help)
        command = flag(command)
    return command


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine (torch has no CUDA device)", param_hint="--device")
    return torch.device(name)


def _preprocess(model_name: str):
    from fastig import models
    from fastig.io.images import Preprocess

    info = models.info(model_name)
    return Preprocess(resize=info.resize_size, crop=info.input_size, mean=info.mean, std=info.std,
                      grayscale=info.channels == 1)


def _chosen_options(method: methods.Method, given: dict) -> dict:
    """The method options the user set; a flag the method has no use for is an error."""
    chosen = {k: v for k, v in given.items() if v is not None}
    for kwarg in chosen:
        if kwarg not in method.options:
            raise click.UsageError(f"{methods.OPTIONS[kwarg].flag} does not apply to --method {method.name}")
    return chosen


@cli.command()
@click.option("--model", "model_name", required=True, help="model name (see `fastig models`)")
@click.option("--weights", default="auto", show_default=True,
              help="auto (the file under checkpoints/), none (random init), or a checkpoint path")
@click.option("--method", "method_name", default="ig", show_default=True, help="method name (see `fastig methods`)")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="an image file; repeat for several")
@click.option("--target", type=int, default=None, help="class to explain (default: each image's top-1 class)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="output folder: attributions.h5 and one heatmap PNG per image")
@click.option("--sign", type=click.Choice(["absolute", "positive", "negative", "all"]), default="absolute",
              show_default=True, help="which attributions the heatmaps show")
@click.option("--overwrite", is_flag=True, help="replace an existing store in --out instead of resuming it")
@_method_options
def attribute(model_name, weights, method_name, images, target, device, out_dir, sign, overwrite, **given):
    """Attribute a model's prediction on images; write an HDF5 store and heatmaps.

    Re-running the same command resumes: images already in --out/attributions.h5 are skipped. A store written
    with another model, method or options is never mixed into: pass --overwrite or another --out.
    """
    from fastig import models
    from fastig.io.heatmap import render_heatmap, save_png
    from fastig.io.images import load_image
    from fastig.io.store import Store

    method = methods.get(method_name)
    options = _chosen_options(method, given)
    if not images:
        raise click.UsageError("give at least one --image")
    dev = _device(device)
    preprocess = _preprocess(model_name)
    inputs = torch.stack([load_image(path, preprocess) for path in images])  # fail on a bad image before any work
    model = models.get(model_name, weights=weights, device=dev)

    store_path = out_dir / "attributions.h5"
    recorded = {**options, "target": target, "images": [str(p) for p in images]}
    store, done = _open_store(store_path, model_name, method_name, recorded, tuple(inputs.shape[-2:]), overwrite)
    todo = [(i, path) for i, path in enumerate(images) if i not in done]
    if done:
        click.echo(f"resuming {store_path}: {len(done)} of {len(images)} image(s) already done", err=True)
    started = time.perf_counter()
    with store, click.progressbar(todo, label=f"{method_name} on {model_name}", file=sys.stderr) as bar:
        for index, path in bar:
            x = inputs[index:index + 1].to(dev)
            with torch.no_grad():
                predicted = int(model(x).argmax(1).item())
            explained = predicted if target is None else target
            result = fastig.attribute(model, x, target=explained, method=method_name, **options)
            heat = result[0].detach().float().cpu()
            store.write_rows(index, [str(path)], [explained], heat.sum(0, keepdim=True))
            picture = render_heatmap(heat, preprocess.to_display(inputs[index]), sign=sign)
            save_png(out_dir / f"{index:04d}_{path.stem}_{method_name}.png", picture)
    seconds = time.perf_counter() - started
    click.echo(f"{len(todo)} image(s) in {seconds:.1f} s -> {store_path} and heatmaps in {out_dir}")


def _open_store(path: Path, model: str, method: str, options: dict, shape: tuple, overwrite: bool):
    """(store, indices already done): a new store, or the same run's store to resume."""
    from fastig.io.store import Store

    if path.exists() and not overwrite:
        store = Store.open(path, "a")
        if not store.matches(model, method, options):
            store.close()
            raise click.UsageError(f"{path} holds a run with other settings ({store.attrs.get('model')}, "
                                   f"{store.attrs.get('method')}, {store.attrs.get('options')}); "
                                   "pass --overwrite or choose another --out")
        return store, set(int(i) for i in store.done_indices())
    return Store.create(path, model=model, method=method, options=options, shape=shape, overwrite=overwrite), set()


# --- listings ------------------------------------------------------------------------------------------------


@cli.command("models")
def list_models():
    """List the models and the checkpoint file each needs."""
    from fastig import models

    for name in models.names():
        info = models.info(name)
        needs = info.filename or "(no file: closed-form weights)"
        click.echo(f"{name:16s} {info.input_size}x{info.input_size}  {info.num_classes:5d} classes  {needs}")


@cli.command("methods")
def list_methods():
    """List the attribution methods and their options."""
    for name in methods.names():
        method = methods.get(name)
        flags = " ".join(methods.OPTIONS[o].flag for o in method.options)
        click.echo(f"{name:24s} {method.summary}" + (f"  [{flags}]" if flags else ""))


@cli.command("convert-dvae")
@click.argument("encoder_pkl", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("decoder_pkl", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for dvae_encoder.pt / dvae_decoder.pt (default: the checkpoints folder)")
def convert_dvae(encoder_pkl, decoder_pkl, out_dir):
    """Convert OpenAI's DALL-E dVAE encoder.pkl/decoder.pkl once into plain weight files.

    The pickles are read without the dall_e package and without running pickled code: only the known dVAE classes
    and tensor storage are admitted; anything else is refused.
    """
    from fastig.models.checkpoints import checkpoint_dir
    from fastig.models.dvae import convert

    for path in convert(encoder_pkl, decoder_pkl, out_dir or checkpoint_dir()):
        click.echo(f"wrote {path}")


@cli.command()
def info():
    """Print the version and which backend (compiled kernel or reference) each op uses."""
    click.echo(_version_text())


# --- demo ----------------------------------------------------------------------------------------------------


@cli.command()
@click.option("--out", "out_dir", default="fastig-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="where the heatmap grid goes")
@click.option("--method", "method_names", multiple=True, help="only these methods (default: all)")
def demo(out_dir, method_names):
    """The center-pixel sanity experiment: which methods find the one pixel that decides the class?

    Runs every method on the 227x227 center-pixel toy model (class = intensity of the center pixel; every other
    pixel counts equally for all classes), prints where each ranks the center pixel (1 = most important) and the
    time it took, and writes a heatmap grid with a row of 5x5 center crops.
    """
    from fastig.demo import run_demo

    run_demo(out_dir, list(method_names) or None, echo=click.echo)


def main() -> None:
    cli.main()


if __name__ == "__main__":
    main()
