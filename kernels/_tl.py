"""@triton.jit helpers shared by the mLSTM and sLSTM kernels (they inline into each kernel).

``INTERPRETED``: whether ``triton.jit`` built interpreted kernels in this process (the
environment at import, exactly as for the kernels; read it through ``_triton.interpreting``).

Triton's interpreter (3.9) multiplies bfloat16 ``tl.dot`` operands as their raw uint16 bits and
truncates float32 -> bfloat16 casts (triton-lang/triton#11584, unsupported upstream): ``mm`` and
``cast`` take the mode ``"interpret-bf16"`` there, which widens the (already bf16-rounded)
operands and rounds to nearest even on the bits, the same products and roundings as a GPU.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

INTERPRET_BF16 = "interpret-bf16"  # the mode of mm / cast for bfloat16 under the interpreter

if triton is not None:

    @triton.jit
    def _probe():
        pass

    INTERPRETED = type(_probe).__name__ == "InterpretedFunction"

    @triton.jit
    def mm(a, b, DOT_PREC: tl.constexpr):
        """tl.dot with float32 accumulation; DOT_PREC is tl.dot's input_precision or "interpret-bf16"."""
        if DOT_PREC == "interpret-bf16":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision=DOT_PREC)

    @triton.jit
    def cast(x, dtype: tl.constexpr, DOT_PREC: tl.constexpr):
        """x.to(dtype), rounding to nearest even as compiled Triton does (also when interpreted)."""
        if DOT_PREC == "interpret-bf16":
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

    @triton.jit
    def _pow2_below(amax):
        """2^floor(log2 amax), 1 where amax is 0: dividing by it and multiplying back are exact."""
        return tl.where(amax > 0, tl.exp2(tl.floor(tl.log2(tl.where(amax > 0, amax, 1.0)))), 1.0)

    @triton.jit
    def mm_rows(a, b, DOT_PREC: tl.constexpr):
        """a (M, K) float32 @ b (K, N), a rounded to b's dtype first (float32 accumulation).

        float16 operands: each row of a is divided by a power of two that brings its largest |value|
        into [1, 2) before the rounding, and the product's row multiplied back (both exact), so a row
        of small weights (the pair weights of nearly closed forget gates reach e^-30, below float16's
        smallest subnormal 6e-8) keeps float16's relative precision instead of flushing to zero.
        Other dtypes (bfloat16 has float32's range) round a as it is."""
        if b.dtype == tl.float16:
            sc = _pow2_below(tl.max(tl.abs(a), 1))  # (M,)
            return mm(cast(a / sc[:, None], b.dtype, DOT_PREC), b, DOT_PREC) * sc[:, None]
        else:
            return mm(cast(a, b.dtype, DOT_PREC), b, DOT_PREC)

    @triton.jit
    def mm_cols(a, b, DOT_PREC: tl.constexpr):
        """a (M, K) @ b (K, N) float32, b rounded to a's dtype first: :func:`mm_rows` with the scale
        per column of b (float16 only)."""
        if a.dtype == tl.float16:
            sc = _pow2_below(tl.max(tl.abs(b), 0))  # (N,)
            return mm(a, cast(b / sc[None, :], a.dtype, DOT_PREC), DOT_PREC) * sc[None, :]
        else:
            return mm(a, cast(b, a.dtype, DOT_PREC), DOT_PREC)

    @triton.jit
    def tile(ptr, r, c, mr, mc, sr, sc):
        """The (len(r), len(c)) tile ptr[r * sr + c * sc] (broadcast), 0 outside rows mr x columns mc."""
        return tl.load(ptr + r[:, None] * sr + c[None, :] * sc, mask=mr[:, None] & mc[None, :], other=0.0)

    @triton.jit
    def store_tile(ptr, x, r, c, mr, mc, sr, sc):
        """Store the tile x where :func:`tile` would load it."""
        tl.store(ptr + r[:, None] * sr + c[None, :] * sc, x, mask=mr[:, None] & mc[None, :])

    @triton.jit
    def logsigmoid(x):
        """log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)), stable for any x."""
        return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))
else:  # the names exist, so kernel modules import them unconditionally (and define no kernels)
    INTERPRETED = False
    mm = mm_rows = mm_cols = cast = logsigmoid = tile = store_tile = None
