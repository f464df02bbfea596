"""Tensor types shared by the IR and the MIL layer: a dtype name and a static shape."""

from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np

#: MIL scalar type names and the numpy dtype that holds their values.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "fp16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
    "int32": np.dtype(np.int32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "int16": np.dtype(np.int16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}
#: MIL's sub-byte integer types (compressed weights' data and palette indices): bits per value. Numpy has no such
#: dtypes, so their values are held one per int8/uint8 element and packed only in weight files.
SUB_BYTE_BITS: dict[str, int] = {"int4": 4, "uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6}
NUMPY_DTYPES.update({name: np.dtype(np.int8 if name.startswith("int") else np.uint8) for name in SUB_BYTE_BITS})
FLOAT_DTYPES = ("fp16", "fp32")
#: The dtypes an IR value may have.
IR_DTYPES = ("fp16", "fp32", "int32", "bool")
#: The dtypes MIL's ``cast`` converts among: iOS17 and later (``ios18`` programs) take all of them, ``ios16``
#: programs only :data:`CAST_DTYPES_IOS16` (coremltools' cast op definitions of those opsets).
CAST_DTYPES = ("fp16", "fp32", "int8", "uint8", "int16", "uint16", "int32", "bool")
CAST_DTYPES_IOS16 = ("fp16", "fp32", "int32", "bool")


def dtype_name(dtype) -> str:
    """The MIL name of a numpy dtype (``float16`` -> ``fp16``)."""
    dtype = np.dtype(dtype)
    for name, np_dtype in NUMPY_DTYPES.items():
        if np_dtype == dtype:
            return name
    raise ValueError(f"no MIL type for numpy dtype {dtype}")


@dataclass(frozen=True)
class TensorType:
    """A MIL type: ``dtype`` and a static ``shape`` (``()`` for a scalar)."""

    dtype: str
    shape: tuple[int, ...] = ()

    @property
    def is_scalar(self) -> bool:
        return self.shape == ()

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # Python ints: read at every run, ten times cheaper than np.prod

    @property
    def nbytes(self) -> int:
        if self.dtype in SUB_BYTE_BITS:  # packed, as in a weight file
            return -(-self.size * SUB_BYTE_BITS[self.dtype] // 8)
        return self.size * NUMPY_DTYPES[self.dtype].itemsize

    @property
    def numpy_dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.dtype]

    def __str__(self) -> str:
        return f"tensor<{self.dtype}, [{', '.join(map(str, self.shape))}]>"

    def short(self) -> str:
        """Compact form for graph printing: ``fp16[1,768,1,64]``."""
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"
