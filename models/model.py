"""xLSTMLM: the language model for both architectures, readable top to bottom.

    model = xLSTMLM(preset("tiny"))
    logits, state = model(input_ids)              # input_ids (B, S) int64 -> logits (B, S, V)
    logits2, state = model(next_ids, state)       # continue: pieces give the logits of the whole

The state is a flat dict of tensors, batch first, keyed "{block}.{tensor}" (see ``state_spec``);
all zeros is a fresh sequence. It is exactly what the ONNX graph carries as ``past.*`` /
``present.*``.

Dtypes: the model computes in the dtype of its parameters (``model.to(torch.float64)``: float64 end
to end). States are float32, or float64 for a float64 model (``state_dtype``); norms reduce in the
same dtype. ``xLSTMLM.from_state_dict`` builds a model directly in a checkpoint's dtype: a
bfloat16 checkpoint is never materialised in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .blocks import LargeBlock, mLSTMBlock, sLSTMBlock
from .config import xLSTMConfig
from .errors import CheckpointError
from .io import load_state_dict_checked, read_pretrained, save_pretrained
from .layers import LayerNorm, RMSNorm, compute_dtype, soft_cap

State = dict[str, torch.Tensor]


class xLSTMLM(nn.Module):
    """The xLSTM language model of ``config`` (either architecture): embedding, the residual blocks,
    the output norm and the LM head (see the module docstring).

        model = xLSTMLM(preset("tiny"))             # random weights; xLSTMLM.from_pretrained(dir) loads
        logits, state = model(input_ids)             # (B, S) int64 -> (B, S, vocab), state dict
        logits, state = model(next_ids, state)       # continue the sequences from ``state``

    ``forward`` carries the recurrent state (``state_spec`` names and shapes it, ``init_state`` is a
    fresh one); ``generate`` decodes greedily or by sampling; ``save_pretrained`` writes our format.
    """

    def __init__(self, config: xLSTMConfig):
        super().__init__()
        if not isinstance(config, xLSTMConfig):
            raise TypeError(f"xLSTMLM takes an xLSTMConfig, got {type(config).__name__}")
        self.config = config
        E = config.embedding_dim
        self.embedding = nn.Embedding(config.vocab_size, E)
        if config.architecture == "paper":
            block_cls = {"mlstm": mLSTMBlock, "slstm": sLSTMBlock}
            self.blocks = nn.ModuleList(block_cls[t](config) for t in config.block_types())
            self.out_norm = LayerNorm(E, config.norm_eps) if config.add_post_blocks_norm else None
        else:
            self.blocks = nn.ModuleList(LargeBlock(config) for _ in range(config.num_blocks))
            self.out_norm = RMSNorm(E, config.norm_eps) if config.add_out_norm else None
        self.lm_head = nn.Linear(E, config.vocab_size, bias=False)
        nn.init.normal_(self.embedding.weight, std=(2.0 / (5.0 * E)) ** 0.5)
        if config.architecture == "paper" and config.tie_weights:
            self.lm_head.weight = self.embedding.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=(2.0 / (5.0 * E)) ** 0.5)

    # --- dtypes --------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (that of its parameters)."""
        return self.embedding.weight.dtype

    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype of every recurrent state tensor: float32, or float64 for a float64 model."""
        return compute_dtype(self.dtype)

    def tie_weights(self) -> None:
        """lm_head shares the embedding matrix where the config says so (again, after loading)."""
        if self.config.architecture == "paper" and self.config.tie_weights:
            self.lm_head.weight = self.embedding.weight

    # --- state ---------------------------------------------------------------------------------
    def state_spec(self, batch_size: int = 1) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every recurrent state tensor (all ``state_dtype``, batch first)."""
        return {
            f"{b}.{name}": shape
            for b, block in enumerate(self.blocks)
            for name, shape in block.state_shapes(batch_size).items()
        }

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The state of a fresh sequence: all zeros."""
        if device is None:
            device = self.embedding.weight.device
        return {
            k: torch.zeros(shape, dtype=self.state_dtype, device=device)
            for k, shape in self.state_spec(batch_size).items()
        }

    def state_bytes(self, batch_size: int = 1) -> int:
        size = self.state_dtype.itemsize
        return sum(size * _numel(s) for s in self.state_spec(batch_size).values())

    def set_backend(self, backend: str) -> "xLSTMLM":
        """Switch the cell kernels of every block (a name from kernels.MLSTM_BACKENDS)."""
        if backend not in kernels.MLSTM_BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {sorted(kernels.MLSTM_BACKENDS)}")
        for block in self.blocks:
            block.backend = backend
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    # --- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """input_ids (B, S) integer, S >= 1 -> (logits (B, S, vocab), new state)."""
        _check_input_ids(input_ids, self.config.vocab_size)
        B = input_ids.shape[0]
        if state is None:
            state = self.init_state(B, input_ids.device)
        else:
            self._check_state(state, B)
        x = self.embedding(input_ids)  # (B, S, E)
        new_state: State = {}
        for b, block in enumerate(self.blocks):
            prefix = f"{b}."
            block_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            x, block_new = block(x, block_state)
            new_state.update({prefix + k: v for k, v in block_new.items()})
        if self.out_norm is not None:
            x = self.out_norm(x)
        logits = self.lm_head(x)  # (B, S, vocab)
        if self.config.architecture == "large":
            logits = soft_cap(logits, self.config.output_logit_soft_cap)
        return logits, new_state

    def _check_state(self, state: State, batch: int) -> None:
        spec = self.state_spec(batch)
        missing = sorted(set(spec) - set(state))
        extra = sorted(set(state) - set(spec))
        if missing or extra:
            raise ValueError(f"state keys do not match the model: missing {missing}, unexpected {extra}")
        for k, shape in spec.items():
            if tuple(state[k].shape) != shape:
                raise ValueError(f"state {k!r} has shape {tuple(state[k].shape)}, expected {shape}")

    # --- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        state: State | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Prefill the prompt (B, S), then decode one token at a time carrying the state.

        temperature 0 is greedy; otherwise sampling (optionally top-k) with ``generator``.
        Returns the new tokens (B, max_new_tokens) and the final state.
        """
        logits, state = self(prompt_ids, state)
        out = []
        for step in range(max_new_tokens):
            tok = sample_next(logits[:, -1], temperature, top_k, generator)  # (B, 1)
            out.append(tok)
            if step + 1 < max_new_tokens:
                logits, state = self(tok, state)
        return torch.cat(out, dim=1), state

    # --- persistence (see models/io.py) -------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, dtype=None, **overrides) -> "xLSTMLM":
        """Load our directory or a transformers xLSTM directory. ``overrides`` replace config fields
        that do not change the weights (e.g. ``backend``, ``chunk_size``). ``dtype`` None keeps the
        checkpoint's dtype (a bfloat16 checkpoint loads as a bfloat16 model), else converts."""
        config, state_dict, tokenizer_files = read_pretrained(directory, **overrides)
        model = cls.from_state_dict(config, state_dict, dtype, source=str(directory))
        model.tokenizer_files = tokenizer_files  # written again by save_pretrained / export
        return model.eval()

    @classmethod
    def from_state_dict(
        cls, config: xLSTMConfig, state_dict: dict[str, torch.Tensor], dtype=None, *, source: str = "checkpoint"
    ) -> "xLSTMLM":
        """A model (CPU, eval mode) holding ``state_dict``'s tensors, built directly in ``dtype``.

        ``dtype`` None keeps the checkpoint's (:func:`checkpoint_dtype`); a torch dtype or a name
        ("fp32", "float64", "bf16", ...) converts. The module is built on the meta device and the
        tensors are assigned (cast where their dtype differs), so no float32 copy of a bfloat16
        checkpoint is ever made and tensors already in the right dtype are used as they are.
        Missing, unexpected or mis-shaped tensors raise ``CheckpointError`` naming them.
        """
        dtype = checkpoint_dtype(state_dict, source) if dtype is None else resolve_dtype(dtype)
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype)  # meta: free
        load_state_dict_checked(model, state_dict, source=source)
        return model.eval()


def sample_next(
    logits: torch.Tensor,  # (B, V)
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B, 1) int64
    """Greedy for temperature 0, else softmax sampling at that temperature (optionally top-k)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


# names a user may give for a model dtype (the CLI's --dtype choices) -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp64": torch.float64, "float64": torch.float64,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype) -> torch.dtype:
    """A model dtype from a torch dtype or one of the names in ``DTYPES``; ValueError otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown model dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def checkpoint_dtype(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> torch.dtype:
    """The dtype a checkpoint is kept in: that of its floating-point tensors (where they mix, the
    dtype holding most elements, e.g. bfloat16 weights beside float32 biases). The values need only
    ``.dtype`` and ``.shape`` (tensors, or the locations of tensors not yet read).

    Raises ``CheckpointError`` when it cannot be kept: integer / quantized tensors, or a floating
    dtype the model does not compute in (float8): the message says so and how to convert.
    """
    counts: dict[torch.dtype, int] = {}
    for name, t in state_dict.items():
        if not t.dtype.is_floating_point:
            raise CheckpointError(
                f"{source}: tensor {name!r} is {str(t.dtype).replace('torch.', '')}: not a floating-point "
                "weight (quantized checkpoints are not supported)"
            )
        counts[t.dtype] = counts.get(t.dtype, 0) + _numel(t.shape)
    if not counts:
        raise CheckpointError(f"{source}: no tensors")
    dtype = max(counts, key=lambda d: (counts[d], d.itemsize))
    if dtype not in DTYPES.values():
        raise CheckpointError(
            f"{source}: the checkpoint's dtype {str(dtype).replace('torch.', '')} cannot be kept (the model "
            f"computes in float32, float64, float16 or bfloat16): choose one with --dtype / dtype="
        )
    return dtype


def _check_input_ids(input_ids, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor (int64), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, S), got {tuple(input_ids.shape)}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one token per sequence, got shape {tuple(input_ids.shape)}")
    if not torch.jit.is_tracing() and not _is_exporting():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")


def _is_exporting() -> bool:
    try:
        return torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
    except AttributeError:
        return False


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
