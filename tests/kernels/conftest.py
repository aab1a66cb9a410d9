"""Run the Triton kernels on the CPU through Triton's interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before triton is first imported, so this runs at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from triton.runtime import interpreter
    except ImportError:
        interpreter = None
    if interpreter is not None and hasattr(interpreter, "_patch_lang_tensor"):
        # Triton 3.6's interpreter turns a scalar (a 1-element array) into a loop bound with int(array),
        # which NumPy >= 2.4 refuses; .item() is what it means.
        _patch_lang_tensor = interpreter._patch_lang_tensor

        def _patch_with_item_index(tensor, scope):
            _patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        interpreter._patch_lang_tensor = _patch_with_item_index
