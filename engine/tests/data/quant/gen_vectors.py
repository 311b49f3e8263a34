#!/usr/bin/env python3
"""Test vectors for the engine's quant layer (engine/src/quant).

Independent references, not this project's code:
  * dequantisation: the `gguf` package's numpy dequantizers (`gguf.quants.dequantize`), whose
    float operations follow ggml's `dequantize_row_*`;
  * Q8_0 activations: `gguf.quants.quantize` (bit-exact with ggml's `quantize_row_q8_0_ref`);
  * Q8_1 / Q8_K activations: small numpy transcriptions of ggml's `quantize_row_q8_1_ref` and
    `quantize_row_q8_K_ref` below (gguf has no quantizer for them);
  * FP8 E4M3FN: the `ml_dtypes` float8_e4m3fn decoding of all 256 codes.

Files (all little-endian):
  deq_<TYPE>.blocks  raw blocks of random bits (scale fields fixed up to finite values)
  deq_<TYPE>.f32     the expected dequantised values
  act_<TYPE>.in      f32 activations; act_<TYPE>.out the expected quantised bytes
  fp8_e4m3fn.f32     256 f32 values, entry i decodes byte i
  real_<TYPE>.blocks / real_<TYPE>.f32
                     the first rows of one tensor per type of the oracle's tiny-model
                     q4_k_m.gguf (made by llama.cpp's quantizer), dequantised by `gguf`

Reproduce (fixed seed, same bytes every run):
  python3 -m venv /tmp/venv && /tmp/venv/bin/pip install gguf numpy ml_dtypes
  /tmp/venv/bin/python engine/tests/data/quant/gen_vectors.py
"""

import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, np_roundf, quantize

OUT = Path(__file__).resolve().parent
rng = np.random.default_rng(20240531)

# Byte offsets of the f16 scale fields inside one block.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
# Blocks per type: enough to cover every sub-block pattern many times, small files.
N_BLOCKS = {T.F32: 512, T.F16: 512, T.BF16: 512}
N_BLOCKS.update({t: 16 for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)})
N_BLOCKS.update({t: 6 for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)})


def scale_bits() -> int:
    """A finite f16 bit pattern: mostly moderate normals of either sign with random mantissa,
    sometimes zero, negative zero, a subnormal, or a large value."""
    r = rng.random()
    sign = int(rng.integers(0, 2)) << 15
    mant = int(rng.integers(0, 1024))
    if r < 0.05:
        return 0
    if r < 0.10:
        return 0x8000
    if r < 0.15:
        return sign | max(mant, 1)  # subnormal
    if r < 0.20:
        return sign | (int(rng.integers(20, 31)) << 10) | mant  # up to 65504
    return sign | (int(rng.integers(1, 19)) << 10) | mant  # 2^-14 .. 2^3


def deq_vectors() -> None:
    for qtype, nb in N_BLOCKS.items():
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(nb, block_bytes), dtype=np.uint8)
        for off in F16_FIELDS.get(qtype, []):
            for b in range(nb):
                raw[b, off:off + 2] = np.frombuffer(struct.pack("<H", scale_bits()), np.uint8)
        data = raw.reshape(-1)
        expected = np.asarray(dequantize(data, qtype), dtype=np.float32).reshape(-1)
        assert expected.size == nb * block_elems
        if qtype not in (T.F32, T.F16, T.BF16):
            assert np.isfinite(expected).all(), qtype.name
        (OUT / f"deq_{qtype.name}.blocks").write_bytes(data.tobytes())
        (OUT / f"deq_{qtype.name}.f32").write_bytes(expected.astype("<f4").tobytes())


def activations(n_blocks: int, qk: int) -> np.ndarray:
    """Blocks of activations at very different scales, plus the hard cases: an all-zero block,
    a block with one outlier, and blocks whose scale is exactly 1 so that halves are ties."""
    blocks = []
    for b in range(n_blocks):
        x = rng.standard_normal(qk).astype(np.float32) * np.float32(10.0 ** rng.uniform(-3, 3))
        blocks.append(x)
    blocks.append(np.zeros(qk, np.float32))
    x = rng.standard_normal(qk).astype(np.float32)
    x[qk // 3] = 1000.0
    blocks.append(x)
    # amax = 127 with a negative maximum: every scale is 1.0 (Q8_K: iscale = 1), and the
    # values k + 0.5 separate round-half-away (Q8_0/Q8_1) from round-half-even (Q8_K).
    ties = (np.arange(qk, dtype=np.float32) % 16) - 7.5
    ties[0] = -127.0
    ties[1] = 126.5
    ties[2] = -0.5
    ties[3] = 0.5
    blocks.append(ties.astype(np.float32))
    # The same with a positive maximum (Q8_K's scale is then negative).
    blocks.append((-ties).astype(np.float32))
    return np.concatenate(blocks)


def q8_1_ref(x: np.ndarray) -> bytes:
    out = bytearray()
    for blk in x.reshape(-1, 32):
        amax = np.float32(np.abs(blk).max())
        d = np.float32(amax / np.float32(127))
        idv = np.float32(1) / d if d != 0 else np.float32(0)
        qs = np_roundf(blk * idv).astype(np.int8)
        s = np.float32(np.float32(int(qs.astype(np.int32).sum())) * d)
        out += np.float16(d).tobytes() + np.float16(s).tobytes() + qs.tobytes()
    return bytes(out)


def q8_k_ref(x: np.ndarray) -> bytes:
    out = bytearray()
    for blk in x.reshape(-1, 256):
        ax = np.abs(blk)
        i = int(np.argmax(ax))  # first index of the largest magnitude, as ggml's strict `>`
        if ax[i] == 0:
            # ggml leaves bsums untouched here; the engine writes zeros.
            out += struct.pack("<f", 0.0) + bytes(256) + bytes(32)
            continue
        iscale = np.float32(-127.0) / blk[i]
        v = np.rint(iscale * blk).astype(np.int32)  # nearest_int: round half to even
        qs = np.minimum(v, 127).astype(np.int8)
        bsums = qs.astype(np.int32).reshape(16, 16).sum(axis=1).astype("<i2")
        d = np.float32(1.0) / iscale
        out += np.float32(d).astype("<f4").tobytes() + qs.tobytes() + bsums.tobytes()
    return bytes(out)


def act_vectors() -> None:
    x = activations(8, 32)
    (OUT / "act_Q8_0.in").write_bytes(x.astype("<f4").tobytes())
    (OUT / "act_Q8_0.out").write_bytes(np.asarray(quantize(x, T.Q8_0)).tobytes())
    (OUT / "act_Q8_1.in").write_bytes(x.astype("<f4").tobytes())
    (OUT / "act_Q8_1.out").write_bytes(q8_1_ref(x))
    x = activations(4, 256)
    (OUT / "act_Q8_K.in").write_bytes(x.astype("<f4").tobytes())
    (OUT / "act_Q8_K.out").write_bytes(q8_k_ref(x))


# One tensor per quant type of the tiny oracle model (llama-quantize output), first rows only.
REAL_GGUF = Path("/work/shared/oracle/models/qlora/gguf/q4_k_m.gguf")
REAL_ROWS = 4


def real_vectors() -> None:
    if not REAL_GGUF.exists():
        print(f"{REAL_GGUF} not found: keeping the committed real_* vectors")
        return
    from gguf import GGUFReader

    seen = set()
    for t in GGUFReader(REAL_GGUF).tensors:
        qtype = t.tensor_type
        if qtype not in F16_FIELDS or qtype in seen:
            continue
        seen.add(qtype)
        rows = np.asarray(t.data).reshape(-1, t.data.shape[-1])[:REAL_ROWS]
        data = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
        expected = np.asarray(dequantize(data, qtype), dtype=np.float32).reshape(-1)
        (OUT / f"real_{qtype.name}.blocks").write_bytes(data.tobytes())
        (OUT / f"real_{qtype.name}.f32").write_bytes(expected.astype("<f4").tobytes())
        print(f"real_{qtype.name}: {t.name}, {expected.size} values")


def fp8_table() -> None:
    codes = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    (OUT / "fp8_e4m3fn.f32").write_bytes(codes.astype(np.float32).astype("<f4").tobytes())


if __name__ == "__main__":
    deq_vectors()
    act_vectors()
    real_vectors()
    fp8_table()
