"""The Triton kernel modules for the kernel tests, interpreted on machines without CUDA.

tests/engine/conftest.py sets TRITON_INTERPRET=1 before triton is first imported; this checks
that it took effect before handing out a kernel module.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch


def triton_module(name: str) -> ModuleType:
    """`kubellm.engine.kernels.<name>`, checking first that on a machine without CUDA Triton
    really runs in its interpreter (fails loudly otherwise: the kernels would not run at all)."""
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.fail("TRITON_INTERPRET=1 must be set before triton is imported (conftest.py)")
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.zeros, InterpretedFunction):
            pytest.fail("triton was imported before TRITON_INTERPRET=1 was set")
    return importlib.import_module(f"kubellm.engine.kernels.{name}")
