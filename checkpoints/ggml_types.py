"""GGML's block-quantized tensor types, decoded into `QuantArray` layouts without changing a bit.

Every decoder takes a tensor's blocks (uint8 [n, bytes per block]) and returns the values in the
layout of a `QuantArray` kind (int8, or GGUF-ordered nibbles for the 4-bit kinds) with the scale and
min of every group, computed with the float32 operations `gguf.quants` uses. `runtime.quant`'s
dequantization of the result then repeats gguf's last step in the same order (x·y = y·x and a − b is
by definition a + (−b) in IEEE arithmetic), so its weights equal `gguf.quants.dequantize` bit for bit:

    type    bits/w  loads as        group  values            scale           min
    Q8_0    8.5     q8_0 (int8)     32     q                 d (f16)         -
    Q4_0    4.5     q4_0 (nibbles)  32     q                 d (f16)         -
    Q4_1    5.0     q4_1 (nibbles)  32     q                 d (f16)         m (f16)
    Q5_0    5.5     q8_0 (int8)     32     q - 16            d (f16)         -
    Q5_1    6.0     q8_0 (int8)     32     q                 d (f16)         m (f16)
    Q2_K    2.625   q8_0 (int8)     16     q                 d·sc (f32)      -(dmin·m) (f32)
    Q3_K    3.4375  q8_0 (int8)     16     q (-4..3)         d·(sc-32) (f32) -
    Q4_K    4.5     q4_1 (nibbles)  32     q                 d·sc (f32)      -(dmin·m) (f32)
    Q5_K    5.5     q8_0 (int8)     32     q                 d·sc (f32)      -(dmin·m) (f32)
    Q6_K    6.5625  q8_0 (int8)     16     q - 32            d·sc (f32)      -
    IQ4_NL  4.5     q8_0 (int8)     32     kvalues[q]        d (f16)         -
    IQ4_XS  4.25    q8_0 (int8)     32     kvalues[q]        d·(sc-32) (f32) -

A K-quant's sub-block scale is the product of a float16 super-block scale and a small integer, which
float16 cannot hold: those scales are float32. (q8_0 with a min is `runtime.quant`'s asymmetric int8.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from xlaserve.runtime.quant import QuantArray

F32 = np.float32
# IQ4_NL's and IQ4_XS's 16 non-linear levels (gguf.quants.IQ4_NL.kvalues).
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 fields: bytes [n, 2] -> [n, 1]."""
    return np.ascontiguousarray(b).view(np.float16)


def _f32(b: np.ndarray) -> np.ndarray:
    return _f16(b).astype(F32)


def _bits(b: np.ndarray, width: int, bits: int) -> np.ndarray:
    """The `bits`-wide fields of bytes b [n, m] in gguf's element order: for each run of `width`
    bytes, the lowest field of every byte, then the next field of every byte, and so on."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8).reshape(1, 1, -1, 1)
    fields = b.reshape(b.shape[0], -1, 1, width) >> shifts
    return (fields & np.uint8((1 << bits) - 1)).reshape(b.shape[0], -1)


def _signed(q: np.ndarray, offset: int) -> np.ndarray:
    return q.astype(np.int8) - np.int8(offset)


def _q8_0(b):
    return b[:, 2:].view(np.int8), _f16(b[:, :2]), None


def _q4_0(b):
    return b[:, 2:], _f16(b[:, :2]), None


def _q4_1(b):
    return b[:, 4:], _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_0(b):
    q = _bits(b[:, 6:], 16, 4) | (_bits(b[:, 2:6], 1, 1) << np.uint8(4))
    return _signed(q, 16), _f16(b[:, :2]), None


def _q5_1(b):
    q = _bits(b[:, 8:], 16, 4) | (_bits(b[:, 4:8], 1, 1) << np.uint8(4))
    return q.view(np.int8), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q2_k(b):
    scales = b[:, :16]
    dl = _f32(b[:, 80:82]) * (scales & np.uint8(0x0F)).astype(F32)
    ml = _f32(b[:, 82:84]) * (scales >> np.uint8(4)).astype(F32)
    return _bits(b[:, 16:80], 32, 2).view(np.int8), dl, -ml


def _q3_k(b):
    s = b[:, 96:108]
    sc = _bits(s[:, :8], 8, 4) | (_bits(s[:, 8:], 4, 2) << np.uint8(4))
    dl = _f32(b[:, 108:110]) * _signed(sc, 32).astype(F32)
    high = (_bits(b[:, :32], 32, 1) ^ np.uint8(1)) << np.uint8(2)  # the offset is 0 where the bit is 1
    return _bits(b[:, 32:96], 32, 2).astype(np.int8) - high.astype(np.int8), dl, None


def _k_scales(b):
    """Q4_K/Q5_K: the 6-bit scales and mins of the 8 sub-blocks, times d and dmin (gguf's order)."""
    s = b[:, 4:16]
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return _f32(b[:, :2]) * sc.astype(F32), -(_f32(b[:, 2:4]) * mn.astype(F32))


def _q4_k(b):
    q = _bits(b[:, 16:], 32, 4).reshape(-1, 32)  # [n * 8 sub-blocks, 32]
    nibbles = q[:, :16] | (q[:, 16:] << np.uint8(4))  # element j low, j + 16 high: q4_1's order
    return nibbles.reshape(b.shape[0], -1), *_k_scales(b)


def _q5_k(b):
    q = _bits(b[:, 48:], 32, 4) | (_bits(b[:, 16:48], 32, 1) << np.uint8(4))
    return q.view(np.int8), *_k_scales(b)


def _q6_k(b):
    dl = _f32(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(F32)
    q = _bits(b[:, :128], 64, 4) | (_bits(b[:, 128:192], 32, 2) << np.uint8(4))
    return _signed(q, 32), dl, None


def _iq4_nl(b):
    return KVALUES[_bits(b[:, 2:], 16, 4)], _f16(b[:, :2]), None


def _iq4_xs(b):
    sc = _bits(b[:, 4:8], 1, 4) | (_bits(b[:, 2:4], 1, 2) << np.uint8(4))
    dl = _f32(b[:, :2]) * _signed(sc, 32).astype(F32)
    return KVALUES[_bits(b[:, 8:], 16, 4)], dl, None


@dataclass(frozen=True)
class GgmlType:
    block: int  # elements per stored block
    nbytes: int  # bytes per stored block
    kind: str  # the QuantArray kind it loads as
    group: int  # the QuantArray block: elements per scale
    asym: bool  # has a min
    decode: Callable  # blocks [n, nbytes] -> (values, scale, min or None), all with n rows

    @property
    def layout(self) -> tuple[str, int, bool]:
        """(kind, group, has a min): what layers must share to be stacked as they are."""
        return self.kind, self.group, self.asym


QUANT_TYPES = {
    "Q8_0": GgmlType(32, 34, "q8_0", 32, False, _q8_0),
    "Q4_0": GgmlType(32, 18, "q4_0", 32, False, _q4_0),
    "Q4_1": GgmlType(32, 20, "q4_1", 32, True, _q4_1),
    "Q5_0": GgmlType(32, 22, "q8_0", 32, False, _q5_0),
    "Q5_1": GgmlType(32, 24, "q8_0", 32, True, _q5_1),
    "Q2_K": GgmlType(256, 84, "q8_0", 16, True, _q2_k),
    "Q3_K": GgmlType(256, 110, "q8_0", 16, False, _q3_k),
    "Q4_K": GgmlType(256, 144, "q4_1", 32, True, _q4_k),
    "Q5_K": GgmlType(256, 176, "q8_0", 32, True, _q5_k),
    "Q6_K": GgmlType(256, 210, "q8_0", 16, False, _q6_k),
    "IQ4_NL": GgmlType(32, 18, "q8_0", 32, False, _iq4_nl),
    "IQ4_XS": GgmlType(256, 136, "q8_0", 32, False, _iq4_xs),
}


def to_quant(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> QuantArray:
    """The raw bytes of a tensor of `type_name` and numpy `shape` [..., K] as a QuantArray (the
    caller has checked that the bytes fit the shape)."""
    t = QUANT_TYPES[type_name]
    *lead, k = shape
    values, scale, mins = t.decode(np.asarray(data).reshape(-1, t.nbytes))
    groups = (*lead, k // t.group)
    return QuantArray(
        data=np.ascontiguousarray(values).reshape(*lead, -1),
        scale=np.ascontiguousarray(scale).reshape(groups),
        min=None if mins is None else np.ascontiguousarray(mins).reshape(groups),
        kind=t.kind,
        block=t.group,
    )
