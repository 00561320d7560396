"""Setup for the tests that need timm / open_clip (run in .venv-vision by ``make test-vision``).

Workaround, test setup only: PyPI's torchvision 0.28.0 wheel does not load its compiled operators beside the
CPU build of torch 2.13.0, and its import then fails at ``register_fake("torchvision::nms")`` because the op
schema was never defined. If (and only if) a plain ``import torchvision`` fails in a subprocess, we define
the two schemas the import needs, ``torchvision::nms`` and ``torchvision::qnms`` (as in torchvision's
csrc/ops/nms.cpp and the quantized kernel), before torchvision is first imported. Models, transforms, timm
and open_clip then build and run; the compiled ops themselves (nms…) stay unavailable, which these tests do
not use. Nothing in the library depends on this.
"""

from __future__ import annotations

import subprocess
import sys

import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _torchvision_imports_cleanly() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, timeout=120)
    return probe.returncode == 0


if "torchvision" not in sys.modules and not _torchvision_imports_cleanly():
    _LIB = torch.library.Library("torchvision", "FRAGMENT")  # kept alive for the session
    _LIB.define("nms" + _SCHEMA)
    _LIB.define("qnms" + _SCHEMA)
