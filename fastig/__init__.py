"""fastig: fast, trustworthy Integrated-Gradients-family attributions for PyTorch image models.

``fastig.attribute(model, inputs, target, method="ig", **options)`` is the functional form of every method;
``fastig.attr`` holds the classes (Captum-named ones are drop-ins); ``fastig.prepare(model)`` makes a model's
passes cheaper; ``fastig.models.get(name)`` builds the model zoo.
"""

__version__ = "0.1.0"

from fastig.api import attribute  # noqa: E402
from fastig.models.prepare import prepare  # noqa: E402


__all__ = ["attribute", "prepare", "__version__"]
