"""One module per method family; importing the package registers them all."""

import importlib
import pkgutil

from .base import METHODS, Method, create_method, list_methods, method_class, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "create_method", "list_methods", "method_class", "register_method"]
