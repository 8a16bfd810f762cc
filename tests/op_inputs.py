"""Random inputs and states of xlstm::mLSTM / xlstm::sLSTM for the tests, shaped by the op spec.

Shapes come from ``xlstm_export.contract`` (MLSTM / SLSTM: every input's dims); values are fresh
random numbers from one generator seeded by the caller, drawn in contract order, never zeros.
Gate pre-activations are spread as in trained models::

    mLSTM   q, k, v ~ N(0, 1)   i ~ i_scale N(0, 1)   f ~ N(f_mean, 1)   (forget gates mostly open)
            state c, n ~ N(0, 1), m ~ 3 N(0, 1); or the state after a random 11-step prefix
    sLSTM   x gate-major [i | f | z | o]: i ~ 2 N(0, 1), f ~ N(3, 1), z, o ~ N(0, 1)
            r ~ N(0, 1) / sqrt(DH), b ~ 0.5 N(0, 1)
            state h ~ tanh N(0, 1), c ~ N(0, 1), n ~ 0.1 + 3 U(0, 1) (> 0), m ~ 3 N(0, 1);
            or the state after a random 9-step prefix

mLSTM values are float32-representable (a float32 kernel and a float64 reference see the same
numbers); ``draw_dtype`` is the dtype the generator draws in (the same seed gives other numbers
in float32 and float64, and the tests' tolerances were measured on one of them).

    >>> q, k, v, i, f = mlstm_inputs(2, 4, 37, 16, 32, seed=1234)          # float32 on the CPU
    >>> c, n, m = mlstm_state(2, 4, 16, 32, "prefix", seed=1235, dtype=torch.float64)
    >>> x, r, b = slstm_inputs(2, 4, 9, 16, seed=2024, dtype=torch.bfloat16)
    >>> err = rel_err(actual, expected)                                    # max |a - e| / max |e|

For the op's node as a whole (every input in contract order, states included) with a test's own
spreads, :func:`op_args`::

    >>> q, k, v, i, f, c0, n0, m0 = op_args(MLSTM, dict(B=2, NH=3, S=5, DQK=8, DV=6), seed=0,
    ...                                     how={"f": lambda z: z + 2.0})
"""

from __future__ import annotations

import torch

from xlstm_export.contract import MLSTM, SLSTM, OpSpec, expected_shape

__all__ = ["MLSTM_PREFIX", "SLSTM_PREFIX", "mlstm_inputs", "mlstm_state", "op_args", "rel_err", "slstm_inputs",
           "slstm_state"]

MLSTM_PREFIX = 11  # steps of the random prefix whose final state is a "prefix" mLSTM state
SLSTM_PREFIX = 9  # the same for the sLSTM


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| over the whole tensor, in float64; asserts equal
    shapes and finite values (a NaN from a poisoned, unwritten output fails here)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    assert torch.isfinite(actual).all(), "non-finite values (an unwritten output?)"
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _shapes(spec: OpSpec, **dims: int) -> dict[str, tuple]:
    """Input name -> shape from the spec's dims ("4*DH" -> 4 * DH)."""
    return {t.name: expected_shape(spec, t, dims) for t in spec.inputs}


def _draw(shapes: dict[str, tuple], names: str, g: torch.Generator, dtype: torch.dtype, how: dict) -> list:
    """One tensor per name, in order: ``how[name](z)`` of a standard normal z (default: z itself)."""
    return [how.get(n, lambda z: z)(torch.randn(shapes[n], generator=g, dtype=dtype)) for n in names.split()]


def op_args(spec: OpSpec, dims: dict[str, int], *, seed: int, dtype=torch.float32, state: bool = True,
            how: dict | None = None, draw_dtype=torch.float32, state_dtype=torch.float32) -> tuple:
    """Every input of ``spec`` in contract order, shaped by its dims: input ``name`` is
    ``how[name](z)`` of a standard normal z (default z), drawn from one generator in that order;
    the T inputs in ``dtype``, the states in ``state_dtype``, or zeros (a fresh sequence) when
    ``state`` is False (then no state is drawn)."""
    shapes = _shapes(spec, **dims)
    g = torch.Generator().manual_seed(seed)
    names = [t.name for t in spec.inputs if state or not t.is_state]
    drawn = dict(zip(names, _draw(shapes, " ".join(names), g, draw_dtype, how or {})))
    return tuple(drawn[t.name].to(state_dtype if t.is_state else dtype) if t.name in drawn
                 else torch.zeros(shapes[t.name], dtype=state_dtype) for t in spec.inputs)


def mlstm_inputs(B, NH, S, DQK, DV, *, seed, dtype=torch.float32, device="cpu", i_scale=2.0, f_mean=3.0,
                 draw_dtype=torch.float32):
    """q, k (B, NH, S, DQK), v (B, NH, S, DV), i, f (B, NH, S) in ``dtype`` on ``device``."""
    shapes = _shapes(MLSTM, B=B, NH=NH, S=S, DQK=DQK, DV=DV)
    g = torch.Generator().manual_seed(seed)
    how = {"i": lambda z: i_scale * z, "f": lambda z: f_mean + z}
    return tuple(t.float().to(device=device, dtype=dtype) for t in _draw(shapes, "q k v i f", g, draw_dtype, how))


def mlstm_state(B, NH, DQK, DV, kind="random", *, seed, dtype=torch.float32, device="cpu", draw_dtype=torch.float32):
    """None (kind "none"), the float64 reference's final state after a random prefix ("prefix"), or
    independent random c (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH) ("random"); float32 values."""
    if kind == "none":
        return None
    if kind == "prefix":
        from xlstm_export.kernels.mlstm.naive import naive_recurrent_mlstm

        prefix = mlstm_inputs(B, NH, MLSTM_PREFIX, DQK, DV, seed=seed, dtype=torch.float64, draw_dtype=torch.float64)
        state = naive_recurrent_mlstm(*prefix)[1]
    else:
        shapes = _shapes(MLSTM, B=B, NH=NH, S=1, DQK=DQK, DV=DV)
        g = torch.Generator().manual_seed(seed)
        state = _draw(shapes, "c0 n0 m0", g, draw_dtype, {"m0": lambda z: 3.0 * z})
    return tuple(t.float().to(device=device, dtype=dtype) for t in state)


def slstm_inputs(B, NH, S, DH, *, seed, dtype=torch.float32, device="cpu"):
    """x (B, NH, S, 4*DH) gate-major, r (NH, DH, 4*DH), b (NH, 4*DH) in ``dtype`` on ``device``
    (drawn in float64 and rounded once)."""
    shapes = _shapes(SLSTM, B=B, NH=NH, S=S, DH=DH)
    g = torch.Generator().manual_seed(seed)
    gates = torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64)[:, None]  # (4, 1) spread of i, f, z, o
    shift = torch.tensor([0.0, 3.0, 0.0, 0.0], dtype=torch.float64)[:, None]  # (4, 1) f mostly open
    how = {
        "x": lambda z: (z.view(B, NH, S, 4, DH) * gates + shift).view(shapes["x"]),
        "r": lambda z: z / DH**0.5,
        "b": lambda z: 0.5 * z,
    }
    return tuple(t.to(device=device, dtype=dtype) for t in _draw(shapes, "x r b", g, torch.float64, how))


def slstm_state(B, NH, DH, kind="random", *, seed, dtype=torch.float32, device="cpu"):
    """None ("none"), the float64 reference's final state after a random prefix ("prefix"), or
    random h, c, n > 0, m ("random"), each (B, NH, DH)."""
    if kind == "none":
        return None
    if kind == "prefix":
        from xlstm_export.kernels.slstm.naive import naive_recurrent_slstm

        state = naive_recurrent_slstm(*slstm_inputs(B, NH, SLSTM_PREFIX, DH, seed=seed, dtype=torch.float64))[1]
    else:
        shapes = _shapes(SLSTM, B=B, NH=NH, S=1, DH=DH)
        g = torch.Generator().manual_seed(seed)
        h, c = _draw(shapes, "h0 c0", g, torch.float64, {"h0": torch.tanh})
        n = 0.1 + 3.0 * torch.rand(shapes["n0"], generator=g, dtype=torch.float64)  # positive
        (m,) = _draw(shapes, "m0", g, torch.float64, {"m0": lambda z: 3.0 * z})
        state = (h, c, n, m)
    return tuple(t.to(device=device, dtype=dtype) for t in state)
