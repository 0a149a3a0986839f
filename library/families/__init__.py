"""Model-family adapters, by family name. Each adapter module is imported only when its trainer runs."""
from __future__ import annotations

import importlib

_ADAPTERS = {"sd1": ("library.families.sd1", "SD1Adapter"),
             "sdxl": ("library.families.sdxl", "SDXLAdapter"),
             "sd3": ("library.families.sd3", "SD3Adapter")}


def get_adapter(family: str):
    """The adapter instance for 'sd1' | 'sdxl' | 'sd3'."""
    module_name, class_name = _ADAPTERS[family]
    return getattr(importlib.import_module(module_name), class_name)()
