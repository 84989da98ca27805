"""The names of the alternative kernels, in one place (no torch import: configs validate with it).

``effml.kernels.library`` implements each one; ``hardware.kernels`` allows some of them on a target
(a list of ``KernelName``); a method asks for the ones it can use (quantization: ``QUANTIZED``; N:M
sparsity: ``SPARSE_2TO4``).
"""

from __future__ import annotations

from effml.choice import choice

QUANTIZED = ("int8_dynamic", "int8_weight_only", "int4_weight_only", "fp8_rowwise", "fp8_dynamic")
SPARSE_2TO4 = ("sparse_2to4", "sparse_2to4_cutlass")  # best first; hardware.kernels says which may run
KERNELS = ("fp8_rowwise", "fp8_dynamic", "int8_dynamic", "int8_weight_only", "int4_weight_only", *SPARSE_2TO4)
assert sorted(KERNELS) == sorted((*QUANTIZED, *SPARSE_2TO4))
KernelName = choice("KernelName", KERNELS)
