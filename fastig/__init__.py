"""fastig: fast, trustworthy Integrated-Gradients-family attributions for PyTorch image models.

``fastig.attribute(model, inputs, target, method="ig", **options)`` is the functional form of every method;
``fastig.attr`` holds the classes (Captum-named ones are drop-ins); ``fastig.prepare(model)`` makes a model's
passes cheaper; ``fastig.models.get(name)`` builds the model zoo.
"""

__version__ = "0.1.0"

from fastig.api import attribute  # noqa: E402


def __getattr__(name):
    if name == "prepare":  # imported on first use: it pulls in the model zoo
        from fastig.models.prepare import prepare

        return prepare
    raise AttributeError(f"module 'fastig' has no attribute {name!r}")


__all__ = ["attribute", "prepare", "__version__"]
