"""The method registry by reference (issue 12 part 2): CLI choice lists are the owning modules' constants, methods
are registered from their classes, every method with a convergence delta can be measured for completeness, and the
package has no import cycle."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import click

import fastig
from fastig import attr, methods
from fastig.attr import lrp, rules
from fastig.attr._base import Attribution
from fastig.attr._path_common import OUTPUTS
from fastig.attr.noise_tunnel import NT_TYPES
from fastig.cli import cli
from fastig.core import baselines, quadrature
from fastig.core.engine import PRECISIONS
from fastig.core.paths import INTERPOLATIONS
from fastig.metrics.completeness import completeness
from fastig.models.dvae import LATENTS

from _shared import SmallCNN


def test_every_cli_choice_list_is_the_owning_modules_constant():
    owners = {
        "rule": quadrature.RULES, "nt_type": NT_TYPES, "output": OUTPUTS, "rules": rules.RULE_NAMES,
        "interpolation": INTERPOLATIONS, "latent": LATENTS, "precision": PRECISIONS,
        "baselines": baselines.BASELINE_KINDS, "baseline_segmentation": baselines.SEGMENTATIONS,
        "baseline_fill": baselines.FILLS,
    }
    choices = {kwarg: o.type for kwarg, o in methods.OPTIONS.items() if isinstance(o.type, tuple)}
    assert set(choices) == set(owners) | {"lrp_rule"}
    for kwarg, owner in owners.items():
        assert choices[kwarg] is owner, kwarg
    assert choices["lrp_rule"] == tuple(lrp.RULES)  # the keys of the rule table


def test_methods_are_registered_from_their_classes():
    model = SmallCNN().eval()
    for name in methods.names():
        spec = methods.get(name)
        assert isinstance(spec.cls, type) and issubclass(spec.cls, Attribution), name
        assert getattr(attr, spec.cls.__name__) is spec.cls, name
        if name != "latent_ig":  # needs the dVAE's files to be built
            built = spec.build(model)
            inner = getattr(built, "method", built)  # the CLI's defaults wrap the perturbation methods
            assert isinstance(inner, spec.cls), name


def test_path_method_is_the_classes_convergence_delta():
    with_delta = {n for n in methods.names() if methods.get(n).cls._has_convergence_delta}
    assert {n for n in methods.names() if methods.get(n).path_method} == with_delta
    assert {"ig", "guided_ig", "blur_ig", "gnl_ig", "latent_ig", "gradient_shap", "deeplift", "deeplift_shap",
            "lrp"} == with_delta


@pytest.mark.parametrize("name", ["gradient_shap", "deeplift", "deeplift_shap", "lrp", "ig"])
def test_completeness_accepts_every_method_with_a_convergence_delta(name):
    model = SmallCNN().double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    options = {"n_samples": 4} if name == "gradient_shap" else {}
    with torch.no_grad():
        top = model(x).argmax(1)
    torch.manual_seed(1), np.random.seed(1)  # GradientShap draws its noise (torch) and path points (numpy)
    result = completeness(model, x, method=name, **options)
    torch.manual_seed(1), np.random.seed(1)
    _, delta = fastig.attribute(model, x, target=top, method=name, return_convergence_delta=True, **options)
    expected = delta.double().reshape(2, -1).mean(1).numpy()  # GradientShap: one delta per (example, sample)
    assert result.delta.shape == (2,) and np.isfinite(result.delta).all()
    np.testing.assert_allclose(result.delta, expected, rtol=1e-9, atol=1e-12)


def test_completeness_still_refuses_methods_without_a_delta():
    with pytest.raises(ValueError, match="path method"):
        completeness(SmallCNN().eval(), torch.rand(1, 3, 8, 8), method="saliency")


def test_the_cli_flags_offer_exactly_the_catalogues_choices():
    command = cli.commands["attribute"]
    offered = {p.name: tuple(p.type.choices) for p in command.params if isinstance(p.type, click.Choice)}
    for kwarg, option in methods.OPTIONS.items():
        if isinstance(option.type, tuple):
            assert offered[kwarg] == option.type, kwarg


def _imports(path: Path, package: Path, modules: set[str]) -> set[str]:
    """The fastig modules ``path`` imports anywhere (also inside functions)."""
    name = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fastig")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            if base.startswith("fastig"):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    # importing a module initializes its parent packages first anyway: those edges are not cycles
    return {m for m in found & modules if m != name and not name.startswith(m + ".")}


def test_the_package_has_no_import_cycle():
    package = Path(fastig.__file__).parent
    files = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    graph = {name: _imports(path, package, set(files)) for name, path in files.items()}
    state: dict[str, int] = {}

    def visit(name, trail):
        state[name] = 1
        for other in sorted(graph[name]):
            assert state.get(other) != 1, "import cycle: " + " -> ".join(trail + [name, other])
            if other not in state:
                visit(other, trail + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_core_imports_nothing_above_it():
    """fastig.core (the engine, paths, rules, baselines) imports only itself and the layers below it (the compiled
    ops, the errors, io), also inside functions: never fastig.attr, fastig.models, fastig.metrics or the drivers."""
    package = Path(fastig.__file__).parent
    modules = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
               for p in package.rglob("*.py")}
    below = ("fastig.core", "fastig._ops", "fastig.errors", "fastig.io")
    core_files = sorted((package / "core").glob("*.py"))
    assert len(core_files) > 5
    for path in core_files:
        upward = {m for m in _imports(path, package, modules)
                  if not any(m == b or m.startswith(b + ".") for b in below)}
        assert not upward, f"{path.relative_to(package.parent)} imports {sorted(upward)}"
