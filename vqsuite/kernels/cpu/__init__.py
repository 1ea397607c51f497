"""The CPU kernel family (``cpu.qlinear``): torch's packed int4/int8 CPU GEMMs behind the dispatcher.

Registered for the ``"qlinear"`` op beside the Triton families; it accepts CPU tensors only (so the Triton
interpreter, which also runs on CPU tensors, is tried first when ``TRITON_INTERPRET=1``). See
:mod:`vqsuite.kernels.cpu.qlinear` for the routes and the choice table.
"""

from __future__ import annotations

from vqsuite.kernels.dispatch import KernelImpl, register_fast
from vqsuite.kernels.operands import QLinearOperands


def _accepts(x, ops: QLinearOperands | None = None, layer=None) -> bool:  # noqa: ANN001
    from vqsuite.kernels.cpu import qlinear

    if x.device.type != "cpu":
        return False
    return qlinear.accepts(x, ops, layer)


def _run(x, ops: QLinearOperands):  # noqa: ANN001, ANN202
    from vqsuite.kernels.cpu import qlinear

    return qlinear.qlinear(x, ops)


def _pack(ops: QLinearOperands) -> dict:
    from vqsuite.kernels.cpu import qlinear

    return qlinear.pack(ops)


#: the family's dispatcher entry
CPU_QLINEAR = KernelImpl(name="cpu.qlinear", fn=_run, accepts=_accepts, pack=_pack)


def register_cpu_kernels() -> None:
    register_fast("qlinear", CPU_QLINEAR)
