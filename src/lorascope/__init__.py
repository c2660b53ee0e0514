"""lorascope: what did this LoRA adapter change inside the model?

Stages (each a sub-package, data flows one way):
data -> models -> activations -> saes -> geometry -> report
"""

from lorascope.errors import LorascopeError

__version__ = "0.1.0"
__all__ = ["LorascopeError", "__version__"]
