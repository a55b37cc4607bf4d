"""The ``fastig`` command line.

Every user error (an unknown model or method, a missing checkpoint, an unreadable image, a bad option) is printed
as one line, ``fastig: error: ...``, with exit code 2. A failure of the machine (disk full, file-size limit, any
other OS error) is one line too, with exit code 1, and so is a run that could attribute nothing. Tracebacks are
left for bugs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
import torch
from click.core import ParameterSource

import fastig
from fastig import methods
from fastig.errors import FastigError, ResourceError, int_problem


class IntAtLeast(click.ParamType):
    """An integer flag, checked by fastig's one rule for integers (:func:`fastig.errors.check_int`):
    ``IntAtLeast(1)`` takes a positive integer, ``IntAtLeast(0)`` a non-negative one. A bad value is the usual
    one-line error, ``Invalid value for '--workers': must be a non-negative integer, got -1`` (exit code 2)."""

    name = "integer"

    def __init__(self, minimum: int = 1) -> None:
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        problem = int_problem(value, self.minimum)
        if problem is not None:
            self.fail(problem, param, ctx)
        return int(value)


class _OldFlag(click.Option):
    """The old name of a renamed flag, kept working: hidden from --help; given, it prints one warning that names
    the new flag and sets that flag's value (in :meth:`_Command.invoke`, once every flag is parsed)."""

    def __init__(self, old: str, new: str, dest: str, type) -> None:
        super().__init__([old, f"old_{dest}"], type=type, default=None, hidden=True, expose_value=False,
                         callback=self._remember)
        self.old, self.new, self.dest = old, new, dest

    def _remember(self, ctx, _param, value):
        if value is not None:
            ctx.meta.setdefault("fastig.old_flags", []).append((self, value))
        return value


def _old_flag(old: str, new: str, dest: str, type=None):
    """Decorator: keep ``old`` working as a deprecated name of the flag ``new`` (parameter ``dest``)."""
    def add(command):
        command.__click_params__ = getattr(command, "__click_params__", [])
        command.__click_params__.append(_OldFlag(old, new, dest, type))
        return command
    return add


class _Command(click.Command):
    """A command whose deprecated flag names (:class:`_OldFlag`) set the new flags' values."""

    def invoke(self, ctx):
        for flag, value in ctx.meta.pop("fastig.old_flags", []):
            if ctx.get_parameter_source(flag.dest) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
                raise click.UsageError(f"{flag.old} is the old name of {flag.new}: give {flag.new} only")
            click.echo(f"fastig: warning: {flag.old} is deprecated: use {flag.new}", err=True)
            ctx.params[flag.dest] = value
        return super().invoke(ctx)


class _Group(click.Group):
    """A click group whose errors are one line each (exit code 2), never a traceback or a usage dump."""

    command_class = _Command

    def main(self, args=None, prog_name=None, **extra):
        try:
            code = super().main(args=args, prog_name=prog_name or "fastig", standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("fastig: aborted", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            click.echo(f"fastig: error: {exc.format_message()}", err=True)
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        except ResourceError as exc:
            click.echo(f"fastig: error: {exc}", err=True)
            sys.exit(1)
        except (FastigError, ValueError, TypeError) as exc:
            click.echo(f"fastig: error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:  # the machine, not the user's input: a full disk, a lost mount, ...
            click.echo(f"fastig: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
                       err=True)
            sys.exit(1)
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


class _MethodOption(click.Option):
    """A flag of the shared method-option catalogue; its help ends with each method's default, read from the
    methods (fastig.methods.defaults) only when the help is shown."""

    def get_help_record(self, ctx):
        if not getattr(self, "_with_defaults", False):
            self.help = f"{self.help} [{_defaults_text(self.name)}]"
            self._with_defaults = True
        return super().get_help_record(ctx)


def _defaults_text(kwarg: str) -> str:
    """``default: 50 (ig, gnl_ig), 200 (guided_ig)``: the methods that take the option, grouped by default."""
    by_default: dict[str, list[str]] = {}
    for name in methods.names():
        if kwarg in methods.get(name).options:
            by_default.setdefault(methods.describe_default(methods.defaults(name)[kwarg], kwarg), []).append(name)
    if len(by_default) == 1:
        (value, names), = by_default.items()
        return f"default: {value} ({', '.join(names)})"
    return "defaults: " + ", ".join(f"{value} ({', '.join(names)})" for value, names in by_default.items())


def _method_options(command):
    """Add one flag per option in the shared catalogue (fastig.methods.OPTIONS)."""
    for option in sorted(methods.OPTIONS.values(), key=lambda o: o.flag, reverse=True):
        if option.type is bool:
            kind = {"is_flag": True}
        elif isinstance(option.type, tuple):
            kind = {"type": click.Choice(option.type)}
        else:
            kind = {"type": option.type}
        command = click.option(option.flag, option.kwarg, cls=_MethodOption, default=None, help=option.help,
                               **kind)(command)
        for old in option.old_flags:
            command = _old_flag(old, option.flag, option.kwarg, kind.get("type"))(command)
    return command


def _naming_the_flag(error: Exception, options: dict) -> Exception:
    """A method's error about one of the chosen options (``n_steps must be ...``) as the error of its flag (the
    run's own errors, about the folder or the selection, stay as they are)."""
    from fastig.io.store import StoreError
    from fastig.run import RunError

    if isinstance(error, (StoreError, RunError)):
        return error
    for kwarg in options:
        if re.search(rf"\b{re.escape(kwarg)}\b", str(error)):
            return click.BadParameter(str(error), param_hint=methods.OPTIONS[kwarg].flag)
    return error


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine (torch has no CUDA device)", param_hint="--device")
    return torch.device(name)


def _chosen_options(method: methods.Method, given: dict) -> dict:
    """The method options the user set; a flag the method has no use for is an error."""
    chosen = {k: v for k, v in given.items() if v is not None}
    for kwarg in chosen:
        if kwarg not in method.options:
            raise click.UsageError(f"{methods.OPTIONS[kwarg].flag} does not apply to --method {method.name}")
    if chosen.get("n_steps") == "auto" and "tolerance" not in method.options:
        raise click.UsageError(f"--steps auto does not apply to --method {method.name} (only to "
                               f"{', '.join(n for n in methods.names() if 'tolerance' in methods.get(n).options)})")
    for kwarg in methods.ADAPTIVE:
        if kwarg in chosen and chosen.get("n_steps") != "auto":
            raise click.UsageError(f"{methods.OPTIONS[kwarg].flag} applies with --steps auto")
    return chosen


class _TargetType(click.ParamType):
    """--target: a class index (>= 0), `predicted` or `label`."""

    name = "CLASS|predicted|label"

    def convert(self, value, param, ctx):
        if value in ("predicted", "label"):
            return value
        try:
            index = int(value)
        except ValueError:
            self.fail(f"{value!r} is not a class index, 'predicted' or 'label'", param, ctx)
        if index < 0:
            self.fail(f"{value!r}: a class index is >= 0 (-1 is not the last class here)", param, ctx)
        return index


def _out_folder(_ctx, _param, value):
    """--out: an empty path would be the current folder, which the user did not name."""
    if not value.strip():
        raise click.BadParameter("an empty path; name the output folder", param_hint="--out")
    return Path(value)


def _parse_shard(value: str | None):
    if value is None:
        return None
    try:
        rank, world = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected RANK/WORLD such as 1/4, got {value!r}", param_hint="--shard") from None
    return rank, world


@cli.command()
@click.option("--model", "model_name", required=True, help="model name (see `fastig models`)")
@click.option("--weights", default="auto", show_default=True,
              help="auto (the file under checkpoints/), none (random init drawn from --seed), or a checkpoint path")
@click.option("--seed", type=IntAtLeast(0), default=0, show_default=True,
              help="seeds --weights none and each image's random draws (SmoothGrad, LIME, SHAP, ...); recorded")
@click.option("--method", "method_name", default="ig", show_default=True, help="method name (see `fastig methods`)")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="an image file; repeat for several")
@click.option("--dataset", type=click.Path(exists=True, path_type=Path),
              help="a dataset folder (class folders, ImageNet val layouts) or a text file listing images")
@click.option("--layout", type=click.Choice(["auto", "folder", "imagenet_loc", "imagenet_devkit", "tiny_imagenet",
                                             "places365", "flat", "list"]), default="auto", show_default=True,
              help="dataset layout (auto detects it)")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="label file to use instead of the layout's own (LOC_val_solution.csv, ground truth, annotations)")
@click.option("--start", type=IntAtLeast(0), default=0, show_default=True, help="first dataset index")
@click.option("--stride", "index_stride", type=IntAtLeast(1), default=1, show_default=True,
              help="take every k-th dataset index")
@click.option("--end", type=IntAtLeast(0), default=None, help="dataset index to stop before (default: the end)")
@click.option("--correct-only", is_flag=True, help="only images the model classifies correctly (needs labels)")
@click.option("--min-confidence", type=float, default=None,
              help="only images whose top-1 softmax probability is at least this")
@click.option("--target", type=_TargetType(), default=None,
              help="class to explain: an index, `label`, or `predicted` (default: each image's top-1 class)")
@click.option("--images-per-batch", type=IntAtLeast(1), default=8, show_default=True,
              help="images decoded, filtered and attributed together (their model passes are batched by "
              "--inputs-per-pass)")
@click.option("--workers", type=IntAtLeast(0), default=None,
              help="image decoding processes (default: 0 for --image, min(4, CPUs) for --dataset)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), callback=_out_folder,
              help="output folder: attributions.h5 (and heatmap PNGs)")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="precision of the stored attributions")
@click.option("--heatmaps/--no-heatmaps", default=None,
              help="write a heatmap PNG per image (default: with --image, not with --dataset)")
@click.option("--sign", type=click.Choice(["absolute", "positive", "negative", "all"]), default="absolute",
              show_default=True, help="which attributions the heatmaps show")
@click.option("--shard", default=None, metavar="RANK/WORLD",
              help="run one shard by hand (without torchrun); the last shard to finish merges")
@click.option("--fsync/--no-fsync", default=True, show_default=True,
              help="fsync the journal after every batch (survives power loss, not only a killed process)")
@click.option("--prepare", "prepare_model", is_flag=True,
              help="fastig.prepare the model first (BatchNorm folded into the convolutions, channels_last): "
              "cheaper passes, float32 rounding of its own; recorded in the run (not with --method lrp)")
@click.option("--overwrite", is_flag=True, help="start over: delete the store and journals in --out")
@click.option("--evaluate", "evaluate_metrics", default=None, metavar="METRIC[,METRIC...]",
              help="score the attributions right after the run (as `fastig evaluate`), e.g. insertion,deletion")
@_method_options
def attribute(model_name, weights, seed, method_name, images, dataset, layout, labels, start, index_stride, end,
              correct_only, min_confidence, target, images_per_batch, workers, device, out_dir, dtype, heatmaps,
              sign, shard, fsync, prepare_model, overwrite, evaluate_metrics, **given):
    """Attribute a model's predictions on images or a dataset; write an HDF5 store (and heatmaps).

    \b
    fastig attribute --model resnet50 --method ig --image cat.jpg --out results/
    fastig attribute --model resnet50 --dataset val/ --end 1000 --correct-only --out r/
    torchrun --nproc_per_node 8 -m fastig attribute --device cuda --dataset val/ ...

    Results are journaled as they finish and merged into --out/attributions.h5 at the end. Re-running the same
    command resumes (images already recorded are skipped; damaged ones are redone), also after a crash or kill.
    Settings that differ from the recorded run (model, weights' sha256 or seed, method and options, images,
    target, filters, --prepare) are refused: pass --overwrite or another --out. Under torchrun each rank takes every
    WORLD-th image and rank 0 merges. Exit code 1 when nothing could be attributed or the disk is full (every
    finished row is kept: rerun to go on), 2 for a bad argument.
    """
    from fastig.run import RunSpec, run

    method = methods.get(method_name)
    options = _chosen_options(method, given)
    if images and dataset is not None:
        raise click.UsageError("give --image or --dataset, not both")
    if not images and dataset is None:
        raise click.UsageError("give at least one --image, or --dataset ROOT")
    if images and (start, index_stride, end, layout, labels) != (0, 1, None, "auto", None):
        raise click.UsageError("--start/--stride/--end/--layout/--labels select from a --dataset")
    if images and target == "label":
        raise click.UsageError("--target label needs labelled images, and --image files have none: give --dataset "
                               "with labels, or a class index")
    _device(device)
    if method.check is not None:
        method.check(options)  # e.g. latent IG's dVAE files: a missing one is named before the run starts
    spec = RunSpec(model=model_name, method=method_name, out_dir=out_dir, weights=weights, options=options,
                   images=list(images) or None, dataset=dataset, layout=layout, labels=labels, start=start,
                   stride=index_stride, end=end, target=target, correct_only=correct_only,
                   min_confidence=min_confidence, images_per_batch=images_per_batch, workers=workers, device=device,
                   dtype=dtype, heatmaps=heatmaps, sign=sign, overwrite=overwrite, shard=_parse_shard(shard),
                   fsync=fsync, seed=seed, prepare=prepare_model)
    if evaluate_metrics:
        from fastig.metrics.evaluate import resolve_metrics

        resolve_metrics(evaluate_metrics)  # an unknown metric fails before the run, not after it
    try:
        summary = run(spec, echo=lambda line: click.echo(line, err=True))
    except (ValueError, FastigError) as e:
        raise _naming_the_flag(e, options) from None
    for line in summary.lines():
        click.echo(line)
    if summary.exit_code:
        click.get_current_context().exit(summary.exit_code)
    if evaluate_metrics and summary.merged is not None:  # the process that merged the final store scores it
        _evaluate(summary.store, evaluate_metrics, model=model_name, weights=weights, device=device, seed=seed)


# --- evaluate ------------------------------------------------------------------------------------------------


def _evaluate(store_path: Path, metrics, **settings) -> None:
    from fastig.metrics import evaluate_store, format_table

    rows = evaluate_store(store_path, metrics, progress=lambda line: click.echo(line, err=True), **settings)
    click.echo(format_table(rows))


@cli.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--metric", "metrics", multiple=True, required=True,
              help="insertion, deletion, sic, aic (pic = both), lossy_mse, completeness; repeat or comma-separate")
@click.option("--model", "model_name", default=None, help="model to score with (default: the store's model)")
@click.option("--weights", default="auto", show_default=True, help="auto, none, or a checkpoint path")
@click.option("--seed", type=IntAtLeast(0), default=None,
              help="seed of --weights none (default: the one the store records)")
@click.option("--dataset-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="where the store's dataset images are now, when the dataset was moved (default: as recorded)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--step", type=IntAtLeast(1), default=None,
              help="insertion/deletion: pixels per step (default: image width)")
@click.option("--insertion-substrate", type=click.Choice(["blur", "zeros", "mean"]), default="blur",
              show_default=True)
@click.option("--deletion-substrate", type=click.Choice(["blur", "zeros", "mean"]), default="zeros",
              show_default=True)
@click.option("--abs-saliency", is_flag=True, help="rank pixels by |attribution| instead of the signed value")
@click.option("--information", type=click.Choice(["webp", "png", "webp_pil"]), default="webp", show_default=True,
              help="PIC information estimator: lossless WebP (as PAIR), PNG (as the reproducibility study)")
@click.option("--aggregation", type=click.Choice(["median", "mean"]), default="median", show_default=True,
              help="how PIC curves are aggregated over images")
@click.option("--quality", type=int, default=75, show_default=True, help="lossy_mse: JPEG quality")
@click.option("--inputs-per-pass", "batch_size", type=IntAtLeast(1), default=8, show_default=True,
              help="model inputs (perturbed images) per pass (8 suits a CPU; use more on a GPU)")
@_old_flag("--batch-size", "--inputs-per-pass", "batch_size", IntAtLeast(1))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for the plots (default: metrics/ beside the store)")
@click.option("--plots/--no-plots", default=True, show_default=True, help="write curve plots and heatmap grids")
def evaluate(store, metrics, model_name, device, abs_saliency, batch_size, out_dir, **settings):
    """Score the attributions in STORE; write per-image scores and curves into it and print a summary."""
    _device(device)
    _evaluate(store, list(metrics), model=model_name, device=device, abs_saliency=abs_saliency,
              batch_size=batch_size, out_dir=out_dir, **settings)


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
    """List the attribution methods, and their options with their defaults."""
    for name in methods.names():
        method = methods.get(name)
        defaults = methods.defaults(name)
        flags = " ".join(f"{methods.OPTIONS[o].flag.split('/')[0]} {methods.describe_default(defaults[o], o)}"
                         for o in method.options)
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


def _bench_precision(command):
    """--precision for `bench`, unless the shared option catalogue already has one (then it comes from there)."""
    if "precision" in methods.OPTIONS:
        return command
    return click.option("--precision", "precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                        help="fastig's precision= (the reference runs under torch.autocast); default fp32")(command)


@cli.command("bench")
@click.option("--model", "model_name", required=True,
              help="a zoo model (`fastig models`) or your own: package.module:factory (factory() -> nn.Module)")
@click.option("--weights", default="none", show_default=True,
              help="zoo models: none (random; the speed does not depend on the weights), auto, or a path")
@click.option("--method", "method_name", default="ig", show_default=True, help="method name (see `fastig methods`)")
@click.option("--images", "n_images", type=IntAtLeast(1), default=1, show_default=True, help="random images per call")
@click.option("--input-shape", default=None, metavar="C,H,W", help="input shape (needed for models outside the zoo)")
@click.option("--target", type=IntAtLeast(0), default=0, show_default=True, help="class explained")
@click.option("--repeats", type=IntAtLeast(1), default=3, show_default=True, help="timed rounds per implementation")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="also time the reference implementation (Captum, or PAIR saliency for guided_ig/blur_ig)")
@_bench_precision
@_method_options
def bench(model_name, weights, method_name, n_images, input_shape, target, repeats, device, reference, **given):
    """Time fastig against Captum (or the method's reference) on your model and settings, in this process.

    \b
    fastig bench --model resnet50 --method ig --steps 32
    fastig bench --model mypackage.nets:build --input-shape 3,64,64 --method saliency --images 8

    Prints a table: median and best seconds, the ratio to fastig, the share of time outside the model's passes,
    the passes made and the peak memory growth; then how far the two attributions differ.
    """
    from fastig.bench import bench as run_bench, load_model

    precision = given.pop("precision", None) or "fp32"
    method = methods.get(method_name)
    options = _chosen_options(method, given)
    shape = None
    if input_shape is not None:
        try:
            shape = tuple(int(v) for v in input_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise click.BadParameter(f"expected C,H,W such as 3,224,224, got {input_shape!r}",
                                     param_hint="--input-shape")
    model, shape = load_model(model_name, weights, str(_device(device)), shape)
    torch.manual_seed(0)
    inputs = torch.randn((n_images,) + shape, device=device)
    report = run_bench(model, inputs, target, method_name, repeats=repeats, precision=precision, reference=reference,
                       model_name=model_name, **options)
    for line in report.lines():
        click.echo(line)


@cli.command("fetch-weights")
@click.argument("names", nargs=-1, required=True, metavar="NAME... | all")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder to write into (default: the checkpoints folder, $FASTIG_CHECKPOINTS)")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="seconds a connection may stay silent before the download fails")
def fetch_weights(names, out_dir, timeout):
    """Download official weight files (checkpoints/README.md) with their checks; `all` fetches every one.

    NAME is a model of `fastig models` that needs a file, or `dvae` (OpenAI's encoder.pkl/decoder.pkl for latent
    IG, converted safely into dvae_encoder.pt/dvae_decoder.pt). Files already there are kept. FASTIG_OFFLINE=1
    forbids downloads.
    """
    from fastig.models import download

    chosen = download.names() if "all" in names else list(dict.fromkeys(names))
    for name in chosen:
        if name not in download.names():
            raise click.BadParameter(f"unknown weights {name!r}; known: {', '.join(download.names())}, all",
                                     param_hint="NAME")
    for name in chosen:
        download.fetch(name, out_dir, timeout=timeout, echo=click.echo)


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


# --- deliberative explanations -------------------------------------------------------------------------------


def _weights_option(value: str) -> str:
    if value != "none" and not Path(value).is_file():
        raise click.BadParameter(f"no such file {value!r} (give a checkpoint file or 'none' for random weights)")
    return value


@cli.command()
@click.option("--model", "model_name", required=True, help="architecture (see `fastig models`), built with the "
              "dataset's number of classes")
@click.option("--weights", required=True, callback=lambda c, p, v: _weights_option(v),
              help="the classifier's checkpoint (trained on the dataset), or 'none' for random weights (seeded)")
@click.option("--layer", required=True, help="the layer of the maps, e.g. features.29 (VGG16 conv5_3 ReLU), layer4")
@click.option("--dataset", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="a CUB-200-2011 or ADE20K (ADEChallengeData2016) root")
@click.option("--difficulty", type=click.Choice(["hp", "cs", "entropy"]), default="hp", show_default=True,
              help="difficulty score: hardness predictor, 1 - confidence, or normalized entropy")
@click.option("--hardness", default="none", show_default=True, callback=lambda c, p, v: _weights_option(v),
              help="--difficulty hp: the hardness predictor's checkpoint (`fastig train-hardness`), or 'none'")
@click.option("--attribution", type=click.Choice(["gradient", "ig", "2ndg"]), default="2ndg", show_default=True)
@click.option("--hard", type=IntAtLeast(1), default=100, show_default=True,
              help="explain this many most difficult test images")
@click.option("--top-k", type=IntAtLeast(2), default=5, show_default=True, help="classes per image")
@click.option("--ig-steps", type=IntAtLeast(1), default=50, show_default=True, help="--attribution ig: steps")
@click.option("--input-size", type=IntAtLeast(8), default=None,
              help="resize and crop images to this size (default: the model's, 256 -> 224)")
@click.option("--images-per-batch", "batch_size", type=IntAtLeast(1), default=8, show_default=True,
              help="images whose maps are computed together (one model pass)")
@_old_flag("--batch-size", "--images-per-batch", "batch_size", IntAtLeast(1))
@click.option("--pictures", type=IntAtLeast(0), default=10, show_default=True,
              help="write a picture for this many of the hardest images")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of random weights")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="start over: delete the results in --out")
def deliberate(model_name, weights, layer, dataset, difficulty, hardness, attribution, hard, top_k, ig_steps,
               input_size, batch_size, pictures, seed, device, out_dir, overwrite):
    """Deliberative explanations: insecurity maps of the hardest test images, evaluated against the dataset.

    \b
    fastig deliberate --model vgg16 --weights cub_vgg16.pth --layer features.29 --dataset CUB_200_2011/ \\
        --difficulty hp --hardness hp.pt --attribution 2ndg --hard 100 --out runs/cub

    Writes --out/deliberative.h5 (difficulty scores, the hard images' ambiguous pairs, maps and precision/recall
    over the mask fraction r, the mean curves), curves_vs_r.png, precision_recall.png and pictures/. Re-running the
    same command resumes; other settings are refused (use --overwrite or another --out).
    """
    from fastig.deliberative.run import Settings, run

    _device(device)
    settings = Settings(model=model_name, layer=layer, dataset=str(dataset), weights=weights,
                        attribution=attribution, difficulty=difficulty, hardness=hardness, hard=hard, top_k=top_k,
                        ig_steps=ig_steps, input_size=input_size, batch_size=batch_size, seed=seed,
                        pictures=pictures, device=device)
    summary = run(settings, out_dir, overwrite=overwrite)
    click.echo(f"{summary.test_images} test images scored, {summary.hard_images} hard images explained")
    for name, value in summary.areas.items():
        click.echo(f"{name}: {value:.4f}")
    click.echo(f"results: {summary.store}")


@cli.command("train-hardness")
@click.option("--model", "model_name", required=True, help="the classifier's architecture (see `fastig models`)")
@click.option("--weights", required=True, callback=lambda c, p, v: _weights_option(v),
              help="the classifier's checkpoint, or 'none' for random weights (seeded)")
@click.option("--dataset", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="a CUB-200-2011 or ADE20K root (its training images are used)")
@click.option("--epochs", type=IntAtLeast(1), default=1, show_default=True)
@click.option("--batch-size", type=IntAtLeast(2), default=16, show_default=True, help="images per training step")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True,
              help="Adam learning rate (the released code's)")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-3, show_default=True)
@click.option("--input-size", type=IntAtLeast(8), default=None, help="as for `fastig deliberate`")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the checkpoint to write")
def train_hardness_command(model_name, weights, dataset, epochs, batch_size, lr, weight_decay, input_size, seed,
                           device, out_file):
    """Train a hardness predictor (the `hp` difficulty score) for a classifier on a dataset's training images."""
    from fastig.deliberative.run import train_on_dataset

    _device(device)
    history = train_on_dataset(model_name, weights, dataset, out_file, epochs, batch_size, lr, weight_decay, seed,
                               input_size, device)
    for epoch, loss in enumerate(history, 1):
        click.echo(f"epoch {epoch}: loss {loss:.4f}")
    click.echo(f"hardness predictor: {out_file}")


def main() -> None:
    cli.main()


if __name__ == "__main__":
    main()
