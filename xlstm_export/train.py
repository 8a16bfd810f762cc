"""Train an xLSTMLM on a text file: byte tokens, AdamW, warmup + cosine, checkpoints, DDP.

    xlstm-export train --data input.txt --preset tiny --steps 2000 -o runs/tiny
    xlstm-export train --data input.txt --steps 4000 -o runs/tiny --resume   # continue to step 4000
    torchrun --nproc_per_node=2 -m xlstm_export.train --data input.txt --steps 2000 -o runs/tiny

The output directory is a plain model directory (``config.json`` + ``model.safetensors``, what
``xLSTMLM.from_pretrained``, ``info`` and the exporter read) plus ``trainer_state.pt``: the step,
the optimizer state (saved on the CPU, whatever device trained: the file loads on any machine, and
``optimizer.load_state_dict`` moves it to the parameters' device on resume), the schedule and the
RNG state, loadable with ``torch.load(weights_only=True)``.
A checkpoint is built in a staging directory beside DIR and swapped in whole, so DIR always holds
weights and trainer state of the same step.

Data: the file's bytes are the tokens (vocabulary 256). The last ``--val-fraction`` of the file is
the validation split. Training windows of ``seq_len + 1`` bytes are drawn at random positions of the
training split from a generator seeded by (seed, rank, step): every rank draws its own windows, and
a resumed run draws exactly the windows the uninterrupted run would have drawn. The validation
windows are drawn once (seeded by the seed alone), so eval losses of one run are comparable.

The learning rate is a pure function of the step (linear warmup, then cosine down to ``--min-lr`` at
the last step), so the schedule's state is the step itself plus its four parameters.

Resuming (``--resume``) continues with the saved run's options (``RESUMED_OPTIONS``: data file,
steps, sequence length, batch, schedule, eval and save cadence, seed): an option left out keeps the
checkpoint's value, one given explicitly wins and is reported as changed. The checkpoint also records
the data file's size and SHA-256, so a resumed run says when the file at the same path changed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .fsio import atomic_dir

TRAINER_STATE_NAME = "trainer_state.pt"
TRAINER_STATE_FORMAT = "xlstm_export.trainer_state"
TRAINER_STATE_VERSION = 1
BYTE_VOCAB = 256
MAX_SEED = 2**64 - 1  # the largest seed torch.manual_seed takes
ADAM_BETAS = (0.9, 0.95)  # the usual language-model betas (nanoGPT, NX-AI xlstm experiments)
# the options a checkpoint saves and a resumed run continues with unless given explicitly
RESUMED_OPTIONS = ("data", "steps", "seq_len", "batch_size", "lr", "min_lr", "warmup", "weight_decay",
                   "grad_clip", "val_fraction", "seed", "eval_every", "eval_batches", "save_every", "log_every")


class TrainError(Exception):
    """A problem with the user's input (data file, output directory, options): one line, exit 2."""


# --- configuration ---------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    data: str | None  # path of the training text; None on --resume: the checkpoint's
    output: str  # checkpoint directory (config.json + model.safetensors + trainer_state.pt)
    preset: str | None = None  # model preset for a fresh run; None -> "tiny" (a resumed run reads DIR)
    steps: int = 1000  # total optimizer steps; the cosine schedule ends here
    seq_len: int = 256  # tokens per training window
    batch_size: int = 16  # windows per step and per rank
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4  # learning rate at the last step
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on weight matrices only (not norms, biases, embedding)
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    eval_every: int = 250  # eval loss every this many steps (and at step 0 and the last step)
    eval_batches: int = 20  # validation batches per eval (shared out over the ranks)
    save_every: int = 500  # checkpoint every this many steps (and at the end); 0 = only at the end
    log_every: int = 10  # a log line every this many steps when no progress bar is shown
    val_fraction: float = 0.1  # tail of the file held out for eval; 0 = evaluate on the training text
    seed: int = 0  # model init and data windows
    device: str | None = None  # None -> "cuda" when available, else "cpu"
    backend: str | None = None  # cell backend for this run; None -> the config's ("auto")
    tokenizer: Literal["bytes"] = "bytes"  # byte-level tokens (the only tokenizer so far)
    resume: bool = False  # continue from the checkpoint in `output`
    overwrite: bool = False  # replace an existing checkpoint in `output` with a fresh run
    stop_at: int | None = None  # stop (after saving) at this step; the schedule still spans `steps`
    quiet: bool = False  # no progress bar and no step lines; eval lines and the summary remain
    # under torchrun: how long a rank waits in a collective (the others wait at a barrier while rank 0
    # writes a checkpoint: a large model's on a slow disk outlasts NCCL's default of 10 minutes)
    dist_timeout: float = 60.0  # minutes
    # RESUMED_OPTIONS set explicitly (the command line knows); None: those that differ from the defaults
    given: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise TrainError("--resume and --overwrite exclude each other")
        if not self.resume:  # a resumed run is checked once the checkpoint's options are in
            self.check()

    def check(self) -> None:
        """Every option's range (TrainError naming the option)."""
        if self.data is None:
            raise TrainError("--data is required (only --resume can take it from the checkpoint)")
        positive = ("steps", "seq_len", "batch_size", "eval_every", "eval_batches", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "save_every", "seed"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.seed > MAX_SEED:  # torch.manual_seed takes 64 bits
            raise TrainError(f"--seed must lie in [0, 2**64 - 1], got {self.seed}")
        # an infinite learning rate or decay turns every weight into inf/nan at the first step
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"--lr must be > 0 and finite, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            if self.min_lr > self.lr and "min_lr" not in self.given_options():  # a small --lr alone
                raise TrainError(f"--lr {self.lr:g} is below --min-lr {self.min_lr:g} (the default, or the "
                                 f"checkpoint's); pass a --min-lr <= --lr too, e.g. --min-lr {self.lr / 10:g}")
            raise TrainError(f"--min-lr must lie in [0, --lr={self.lr}], got {self.min_lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise TrainError(f"--weight-decay must be >= 0 and finite, got {self.weight_decay}")
        if not self.grad_clip >= 0:
            raise TrainError(f"--grad-clip must be >= 0 (0 = off), got {self.grad_clip}")
        if not 0 <= self.val_fraction < 1:
            raise TrainError(f"--val-fraction must lie in [0, 1), got {self.val_fraction}")
        if self.tokenizer != "bytes":
            raise TrainError(f"--tokenizer must be 'bytes', got {self.tokenizer!r}")
        if not (self.dist_timeout > 0 and math.isfinite(self.dist_timeout)):
            raise TrainError(f"--dist-timeout must be > 0 minutes and finite, got {self.dist_timeout}")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise TrainError(f"--stop-at must lie in [1, --steps={self.steps}], got {self.stop_at}")

    def hyperparameters(self) -> dict:
        """The options a checkpoint saves (RESUMED_OPTIONS; plain ints, floats and strings)."""
        return {k: getattr(self, k) for k in RESUMED_OPTIONS} | {"data": str(Path(self.data).resolve())}

    def given_options(self) -> frozenset[str]:
        """RESUMED_OPTIONS set explicitly: ``given``, or else those that differ from the defaults."""
        if self.given is not None:
            return frozenset(self.given)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return frozenset(k for k in RESUMED_OPTIONS if k == "data" and self.data is not None
                         or k != "data" and getattr(self, k) != defaults[k])


def resumed_config(cfg: TrainConfig, saved: dict) -> tuple[TrainConfig, dict[str, tuple]]:
    """``cfg`` with the options it leaves out taken from a checkpoint's saved ``args``, and the
    explicit ones that differ from the checkpoint: {name: (saved, now)}. Options the checkpoint
    does not hold (an older one) keep ``cfg``'s value."""
    given = cfg.given_options()
    taken, changed = {}, {}
    for k in RESUMED_OPTIONS:
        if k not in saved:
            continue
        if k not in given:
            taken[k] = saved[k]
        else:
            now = str(Path(cfg.data).resolve()) if k == "data" else getattr(cfg, k)
            if now != saved[k]:
                changed[k] = (saved[k], now)
    resolved = dataclasses.replace(cfg, **taken)
    resolved.check()
    return resolved, changed


@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained xLSTMLM (unwrapped, on the training device)
    step: int  # optimizer steps done (global)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    tokens_per_s: float = 0.0  # over this run's steps, all ranks together
    output: Path | None = None


# --- data ------------------------------------------------------------------------------------------
def read_bytes(path) -> torch.Tensor:
    """The file's bytes as a uint8 tensor (N,), with clear errors for missing or unreadable files."""
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)  # (N,)
    except FileNotFoundError:
        raise TrainError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise TrainError(f"data file {path} is a directory, expected a text file") from None
    except OSError as e:
        raise TrainError(f"cannot read data file {path}: {e.strerror or e}") from None
    return torch.from_numpy(raw)


def split_train_val(
    tokens: torch.Tensor,  # (N,) uint8
    seq_len: int,
    val_fraction: float,
    source: str = "data",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split off the last ``val_fraction`` of the tokens (at least one window of seq_len + 1) for eval.

    With ``val_fraction`` 0 both splits are the whole text.
    """
    n, window = tokens.numel(), seq_len + 1
    if n == 0:
        raise TrainError(f"data file {source} is empty")
    if n < window:
        raise TrainError(
            f"data file {source} has {n} bytes, shorter than one training window of "
            f"--seq-len + 1 = {window} bytes; use a longer file or a smaller --seq-len"
        )
    if val_fraction == 0:
        return tokens, tokens
    n_val = max(math.ceil(n * val_fraction), window)
    if n - n_val < window:
        raise TrainError(
            f"data file {source} has {n} bytes: too short for a training split and a validation "
            f"split of {window} bytes each (--seq-len + 1); use a smaller --seq-len, or "
            "--val-fraction 0 to evaluate on the training text"
        )
    return tokens[: n - n_val], tokens[n - n_val :]


def sample_windows(
    tokens: torch.Tensor,  # (N,) uint8
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: inputs x (B, S) and next-token targets y (B, S), int64."""
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)  # (B,)
    idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, S+1)
    w = tokens[idx].long()  # (B, S+1)
    return w[:, :-1], w[:, 1:]


def window_generator(seed: int, *streams: int) -> torch.Generator:
    """A CPU generator for one stream of windows: (0, rank, step) for training, (1,) for eval."""
    s = np.random.SeedSequence(seed, spawn_key=streams).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(s) >> 1)


def data_fingerprint(tokens: torch.Tensor) -> dict:
    """Size and SHA-256 of the training text (N,) uint8: a checkpoint records them, so a resumed run
    can say when the file at the same path now holds other bytes (other windows, other splits)."""
    import hashlib

    return {"bytes": int(tokens.numel()), "sha256": hashlib.sha256(tokens.contiguous().numpy()).hexdigest()}


# --- optimizer and schedule ------------------------------------------------------------------------
def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): lr*(step+1)/warmup during warmup, then a
    cosine from lr down to min_lr, reached at the last step (steps - 1)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    decay_steps = steps - 1 - warmup
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on the weight matrices of linear maps (nn.Linear incl. lm_head, the
    head-wise block-diagonal projections, the sLSTM recurrent R); none on norms, biases (the sLSTM
    bias is (NH, 4*DH) but a bias), skip vectors, depthwise conv filters or the token embedding
    (as NX-AI xlstm; a tied lm_head counts as the embedding)."""
    from .models.blocks import sLSTMBlock
    from .models.layers import HeadwiseLinear

    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            matrix = (isinstance(module, (torch.nn.Linear, HeadwiseLinear)) and name == "weight") or (
                isinstance(module, sLSTMBlock) and name == "r"
            )
            (decay if matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --- distributed -----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """Rank and world size as torchrun sets them (WORLD_SIZE, RANK, LOCAL_RANK); 1 process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return Dist(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", str(rank))))


def resolve_device(name: str | None, d: Dist) -> torch.device:
    """The training device of this process; a CUDA device is also made the current one.

    Alone or under DDP: the Triton kernels (the "auto" backend's choice on CUDA) launch on
    ``torch.cuda.current_device()``, not on their tensors' device, so a single process given
    ``--device cuda:1`` ran them on GPU 0 with GPU 1's pointers ("Pointer argument cannot be
    accessed from Triton", triton-lang/triton#2441); NCCL's barrier and
    ``torch.cuda.is_bf16_supported()`` read the current device as well. Under torchrun a device
    index other than LOCAL_RANK's is refused: every process would take that one GPU (NCCL then
    fails with "Duplicate GPU detected" at the first collective).
    """
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
        elif d.enabled and device.index != d.local_rank:  # every rank would take that one GPU
            raise TrainError(f"--device {name} under torchrun: each process trains on the GPU of its "
                             f"LOCAL_RANK (this one: cuda:{d.local_rank}); give --device cuda")
        if device.index >= torch.cuda.device_count():
            raise TrainError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise TrainError(f"--device {name}: only cpu and cuda are supported")
    return device


NO_BACKWARD_BACKENDS = ("custom_op",)  # the opaque torch.ops.xlstm.* nodes: forward only


def check_backend(backend: str | None, device: torch.device) -> None:
    from . import kernels

    if backend is None:
        return
    if backend not in kernels.MLSTM_BACKENDS:
        raise TrainError(f"--backend {backend!r} is not a cell backend; known: {sorted(kernels.MLSTM_BACKENDS)}")
    if backend in NO_BACKWARD_BACKENDS:
        raise TrainError(f"--backend {backend} has no backward (it is for ONNX export); use auto, torch or triton")
    if backend == "triton":
        if not kernels.triton_available():
            raise TrainError("--backend triton needs the triton package: pip install 'xlstm-export[triton]'")
        if not kernels.triton_runs_on(device):
            raise TrainError(
                "--backend triton on the CPU runs only under TRITON_INTERPRET=1 (slow, for tests); "
                "use --backend torch or auto"
            )


# --- checkpoints -----------------------------------------------------------------------------------
def is_checkpoint_dir(path: Path) -> bool:
    return (path / TRAINER_STATE_NAME).is_file() or (path / "config.json").is_file()


def output_path(output: str) -> Path:
    """The folder ``-o`` names, as the checkpoint swap needs it: a symlink's target (each save
    replaces the folder whole, which would replace the link and leave its target behind), and never
    the current directory or one holding it (a folder cannot be swapped by the name '.', and a
    process inside a swapped folder is left in a deleted one)."""
    out = Path(output)
    if out.is_symlink():
        out = Path(os.path.realpath(out))
    real = Path(os.path.realpath(out))
    try:
        cwd = Path(os.path.realpath(os.getcwd()))
    except OSError:  # the current directory is gone: nothing to protect
        cwd = None
    if cwd is not None and (real == cwd or real in cwd.parents):
        raise TrainError(
            f"output {output} is the current directory or holds it; every checkpoint replaces that folder "
            "whole, so run from outside it (e.g. cd .. and pass -o with the folder's name)"
        )
    return out


def stranded_checkpoint(out: Path) -> tuple[Path, int] | None:
    """A complete checkpoint of ``out`` left beside it by a save killed outright (SIGKILL, power loss)
    between the two renames of the swap (fsio.atomic_dir): the previous one moved aside as
    ``.NAME.*.tmp.old``, the new one staged as ``.NAME.*.tmp``. The newest of them, with its step."""
    import glob

    found = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.*.tmp*"):
        if not p.name.endswith((".tmp", ".tmp.old")) or not (p / "config.json").is_file():
            continue
        try:  # the trainer state is written last: readable means the folder is whole
            found.append((int(torch.load(p / TRAINER_STATE_NAME, map_location="cpu", weights_only=True)["step"]), p))
        except Exception:
            continue
    if not found:
        return None
    step, path = max(found, key=lambda sp: sp[0])
    return path, step


def check_only_checkpoint_files(out: Path, *, saving: bool = False) -> None:
    """Every save replaces DIR whole: refuse (TrainError) when it holds anything a checkpoint does
    not (notes, logs, the training text itself), which the swap would delete."""
    from .models.io import foreign_entries

    shown = foreign_entries(out, also=(TRAINER_STATE_NAME,))
    if shown:
        if saving:
            raise TrainError(f"cannot write checkpoint {out}: it now holds what a checkpoint does not ({shown}), "
                             "which replacing the folder would delete; move it out and --resume (the last "
                             "checkpoint is unchanged)")
        raise TrainError(f"output {out} holds what a checkpoint does not ({shown}); every save replaces the "
                         "folder whole and would delete it: move it out of the folder")


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Fail before training when the output directory cannot take a checkpoint."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"output {out} exists and is not a directory")
    if resume:
        if not (out / TRAINER_STATE_NAME).is_file() or not (out / "config.json").is_file():
            left = stranded_checkpoint(out)
            hint = (f"; a save killed while swapping it in left the checkpoint of step {left[1]} in {left[0]}: "
                    f"move that folder to {out} and resume") if left else ""
            raise TrainError(f"--resume: {out} holds no checkpoint (config.json + {TRAINER_STATE_NAME}){hint}")
    if (resume or overwrite) and out.is_dir() and is_checkpoint_dir(out):  # replaced at every save
        check_only_checkpoint_files(out)
    if not resume and out.is_dir() and any(out.iterdir()):
        if not is_checkpoint_dir(out):
            raise TrainError(f"output {out} exists, is not empty and is not a checkpoint; choose another -o")
        if not overwrite:
            raise TrainError(
                f"output {out} already holds a checkpoint; pass --resume to continue it or "
                "--overwrite to start over"
            )
    # The checkpoint is staged beside DIR and renamed into place: the parent must be writable.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"cannot create the parent of output {out}: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise TrainError(f"output {out} is not writable: {e.strerror or e}") from None


def on_cpu(obj):
    """``obj`` (nested dicts, lists and tuples, as a state dict is) with every tensor copied to
    the CPU, for a checkpoint that loads on any machine; tensors already there are kept as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def save_checkpoint(model, out: Path, trainer_state: dict) -> None:
    """Write DIR = config.json + model.safetensors + trainer_state.pt, replacing it whole.

    Everything is written into a staging directory next to DIR, then DIR is swapped for it, so a
    crash leaves either the old checkpoint or the new one, never weights of one step with the trainer
    state of another.
    """
    from .models.io import write_pretrained

    if out.is_dir():  # a file put into DIR while training runs is refused, not deleted
        check_only_checkpoint_files(out, saving=True)
    try:
        with atomic_dir(out) as stage:
            write_pretrained(model, stage)  # config.json + model.safetensors
            torch.save(trainer_state, stage / TRAINER_STATE_NAME)
    except OSError as e:
        raise TrainError(f"cannot write checkpoint {out}: {e.strerror or e}") from None


def load_trainer_state(out: Path) -> dict:
    path = out / TRAINER_STATE_NAME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; name the file and the reason
        first = (str(e).strip().splitlines() or [""])[0]
        reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise TrainError(f"{path}: not a readable trainer state ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != TRAINER_STATE_FORMAT:
        raise TrainError(f"{path}: not a trainer state written by xlstm-export train")
    if state.get("version") != TRAINER_STATE_VERSION:
        raise TrainError(f"{path}: trainer state version {state.get('version')}, expected {TRAINER_STATE_VERSION}")
    fields = {"step": int, "tokens_seen": int, "optimizer": dict, "rng": dict, "evals": list, "args": dict}
    for key, typ in fields.items():
        if not isinstance(state.get(key), typ):
            raise TrainError(f"{path}: trainer state has no valid {key!r} ({typ.__name__} expected); "
                             "it was not written by xlstm-export train, or was edited")
    rng = state["rng"].get("torch")
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.dim() == 1):
        raise TrainError(f"{path}: trainer state has no valid 'rng' ('torch': a uint8 tensor expected)")
    if state["step"] < 0:
        raise TrainError(f"{path}: trainer state step {state['step']} is negative")
    return state


def _check_optimizer_shapes(optimizer, model, path: Path) -> None:
    """load_state_dict checks the number of parameters only: moments of other shapes (weights and
    trainer state from different runs) failed at the first step inside AdamW."""
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, t in optimizer.state.get(p, {}).items():
                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != p.shape:
                    raise TrainError(
                        f"{path}: optimizer state does not fit the model ({key} of {names.get(id(p), '?')} is "
                        f"{tuple(t.shape)}, the parameter {tuple(p.shape)}); the weights and the trainer state "
                        "come from different runs"
                    )


# --- the loop --------------------------------------------------------------------------------------
class _Reporter:
    """Rank 0's output: a tqdm bar on a terminal, otherwise a log line every `log_every` steps.

    Tokens/s: the bar shows a moving average over recent steps, a log line the average since the
    previous line; both count the tokens of all ranks.
    """

    def __init__(self, cfg: TrainConfig, d: Dist, start: int, stop: int, tokens_per_step: int):
        self.cfg, self.on, self.stop = cfg, d.main, stop
        self.tokens_per_step = tokens_per_step
        self.t_prev = time.perf_counter()
        self.step_prev = start  # step of the previous log line
        self.window_s = 0.0  # training seconds since the previous log line
        self.total_s = 0.0  # training seconds of this run (evals and checkpoints excluded)
        self.ema_s: float | None = None  # seconds per step, moving average
        self.bar = None
        if self.on and not cfg.quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=stop, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def restart_clock(self) -> None:
        """After an eval or a checkpoint: their time is not training time."""
        self.t_prev = time.perf_counter()

    def line(self, text: str) -> None:
        if not self.on:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, step: int, loss: float, lr: float, gnorm: float) -> None:
        now = time.perf_counter()
        dt, self.t_prev = now - self.t_prev, now
        self.window_s += dt
        self.total_s += dt
        self.ema_s = dt if self.ema_s is None else 0.9 * self.ema_s + 0.1 * dt
        if not self.on:
            return
        if self.bar is not None:
            tok_s = self.tokens_per_step / max(self.ema_s, 1e-9)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
            self.bar.update(1)
        elif not self.cfg.quiet and (step % self.cfg.log_every == 0 or step == self.stop):
            tok_s = (step - self.step_prev) * self.tokens_per_step / max(self.window_s, 1e-9)
            print(f"step {step}/{self.stop} | loss {loss:.4f} | lr {lr:.2e} | grad norm {gnorm:.3f} "
                  f"| {tok_s:,.0f} tok/s", flush=True)
            self.window_s, self.step_prev = 0.0, step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def evaluate(model, windows, device, autocast, d: Dist) -> float:
    """Mean next-token loss over the fixed validation windows; batch i runs on rank i % world."""
    import torch.distributed as dist

    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, token count)
    for x, y in windows[d.rank :: d.world_size]:
        x, y = x.to(device), y.to(device)  # (B, S) each
        with autocast():
            logits, _ = model(x)  # (B, S, V)
        total[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        total[1] += y.numel()
    if d.enabled:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


def train(cfg: TrainConfig) -> TrainResult:
    """Run the training described by ``cfg`` in this process (one rank of torchrun, or alone)."""
    d = dist_from_env()
    out = output_path(cfg.output)
    with output_lock(out, d.main):
        return _train(cfg, d, out)


@contextlib.contextmanager
def output_lock(out: Path, held: bool) -> Iterator[None]:
    """One run writes ``out`` at a time: rank 0 (``held``) holds an exclusive flock on
    ``.NAME.lock`` beside it for the whole run, so a second run with the same ``-o`` fails at once
    (TrainError) instead of alternating its checkpoints with the first's. The file is removed at the
    end while still locked; a run that locked a file removed meanwhile (its inode is no longer at
    the path) tries again. The kernel releases the lock of a run killed outright, and the next run
    takes over the file it left. Without fcntl (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    parent = out.parent if str(out.parent) else Path(".")
    if not held or fcntl is None or not parent.is_dir():  # a missing parent: check_output_dir says so
        yield
        return
    path = parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only parent: nothing can be saved there either, which check_output_dir says
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrainError(f"another training run is writing {out} (it holds {path}); wait for it to end, "
                             "or choose another -o") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file that its holder removed on leaving: take the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _train(cfg: TrainConfig, d: Dist, out: Path) -> TrainResult:
    import torch.distributed as dist

    from .models import CheckpointError, from_pretrained, preset, xLSTMLM

    state = None
    if cfg.resume:  # the checkpoint's options first: they say which data and window length to read
        check_output_dir(out, resume=True, overwrite=False)
        state = load_trainer_state(out)
        cfg, _ = resumed_config(cfg, state.get("args", {}))  # _note_changes reports the differences
    device = resolve_device(cfg.device, d)
    check_backend(cfg.backend, device)
    # Every rank runs the same checks on the same files, so all fail alike before any collective.
    tokens = read_bytes(cfg.data)  # (N,) uint8
    data_id = data_fingerprint(tokens)
    train_tokens, val_tokens = split_train_val(tokens, cfg.seq_len, cfg.val_fraction, source=cfg.data)
    check_output_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)

    if cfg.resume:
        try:
            model = from_pretrained(out)
        except CheckpointError as e:
            raise TrainError(f"--resume: {e}") from None
    else:
        try:
            config = preset(cfg.preset or "tiny")
        except ValueError as e:
            raise TrainError(str(e)) from None
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = xLSTMLM(config)
    if model.config.vocab_size < BYTE_VOCAB:
        name = str(out) if cfg.resume else f"preset {cfg.preset or 'tiny'!r}"
        raise TrainError(
            f"{name} has vocab_size {model.config.vocab_size}; byte-level tokens (--tokenizer bytes) "
            f"need at least {BYTE_VOCAB}"
        )
    from .tokenizer import byte_tokenizer_files

    model.tokenizer_files = byte_tokenizer_files()  # every checkpoint holds the tokenizer it was trained with
    if cfg.backend is not None:  # this run only: config.json keeps its portable backend field
        model.set_backend(cfg.backend)
    model.to(device).train()

    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=ADAM_BETAS,
        fused=device.type == "cuda" or None,
    )
    start, evals, tokens_seen = 0, [], 0
    if state is not None:
        start = int(state["step"])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise TrainError(f"{out / TRAINER_STATE_NAME}: optimizer state does not fit the model ({e})") from None
        _check_optimizer_shapes(optimizer, model, out / TRAINER_STATE_NAME)
        for group, wd in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):
            group["weight_decay"] = wd  # the command line wins over the saved value
        evals = [(int(s), float(v)) for s, v in state["evals"]]
        tokens_seen = int(state["tokens_seen"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and len(state["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    stop = cfg.stop_at if cfg.stop_at is not None else cfg.steps
    if cfg.resume and start >= stop:
        if d.main:
            print(f"{out} is already at step {start} (--steps {cfg.steps}); nothing to do", flush=True)
        return TrainResult(model=model, step=start, evals=evals, output=out)

    autocast = contextlib.nullcontext
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    elif device.type == "cuda" and d.main:
        print("note: this GPU has no bfloat16; training in float32", flush=True)

    if d.enabled:  # a CUDA device is the current one already (resolve_device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=cfg.dist_timeout))
    result = _loop(cfg, d, device, out, model, optimizer, autocast, state, data_id,
                   train_tokens, val_tokens, start, stop, evals, tokens_seen)
    # The process group is destroyed after a run that ended alike on every rank, not on the way out
    # of an exception: a rank that raised alone (out of memory on its GPU, rank 0's checkpoint
    # refused) while the others wait in a collective would hang in NCCL's destroy, which flushes the
    # pending collectives (pytorch/pytorch#141510: "for a bad program, a hang is expected at
    # destroy_process_group()"; torchtitan destroys it on success only, pytorch/torchtitan#1342),
    # and neither exit nor say why; exiting lets torchrun see the failure and stop the other ranks.
    # At exit the group's destructor aborts it instead, which does not wait (ProcessGroupNCCL.cpp,
    # ~ProcessGroupNCCL; it warns "destroy_process_group() was not called before program exit").
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
    return result


def _loop(cfg, d, device, out, model, optimizer, autocast, state, data_id,
          train_tokens, val_tokens, start, stop, evals, tokens_seen) -> TrainResult:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = model
    if d.enabled:
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_gen = window_generator(cfg.seed, 1)
    eval_windows = [
        sample_windows(val_tokens, cfg.batch_size, cfg.seq_len, eval_gen) for _ in range(cfg.eval_batches)
    ]  # [(x (B, S), y (B, S))] the same windows at every eval
    tokens_per_step = cfg.batch_size * cfg.seq_len * d.world_size
    schedule = dict(lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, steps=cfg.steps)
    report = _Reporter(cfg, d, start, stop, tokens_per_step)
    try:  # a bar left open would glue the error or "interrupted" line onto its last render
        if cfg.warmup >= cfg.steps:  # a short run with the default warmup: a learning rate far below --lr
            peak = lr_at(cfg.steps - 1, **schedule)
            report.line(f"note: --warmup {cfg.warmup} >= --steps {cfg.steps}: the learning rate only reaches "
                        f"{peak:.3g} of --lr {cfg.lr:g}; pass a smaller --warmup")

        if state is not None:
            _note_changes(state, cfg, d, report, data_id)
        else:
            n_params = model.num_params()
            report.line(
                f"training {cfg.preset or 'tiny'} ({n_params:,} parameters) on {device}, "
                f"{d.world_size} process{'es' if d.enabled else ''}: "
                f"{train_tokens.numel():,} train / {val_tokens.numel():,} val bytes, "
                f"{tokens_per_step:,} tokens per step"
            )
            loss0 = evaluate(model, eval_windows, device, autocast, d)
            evals.append((0, loss0))
            report.line(f"step 0/{stop} | eval loss {loss0:.4f}")

        def checkpoint(step: int) -> None:
            if d.main:
                trainer_state = {
                    "format": TRAINER_STATE_FORMAT,
                    "version": TRAINER_STATE_VERSION,
                    "step": step,
                    "tokens_seen": tokens_seen,
                    "world_size": d.world_size,
                    "optimizer": on_cpu(optimizer.state_dict()),
                    "schedule": {"name": "warmup_cosine", **schedule},
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                    },
                    "evals": [[s, v] for s, v in evals],
                    "args": cfg.hyperparameters(),
                    "data": data_id,
                }
                save_checkpoint(model, out, trainer_state)
            if d.enabled:
                dist.barrier()

        t_run, step = time.perf_counter(), start
        report.restart_clock()
        for step in range(start + 1, stop + 1):  # `step` counts optimizer steps done after this one
            lr = lr_at(step - 1, **schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen = window_generator(cfg.seed, 0, d.rank, step - 1)
            x, y = sample_windows(train_tokens, cfg.batch_size, cfg.seq_len, gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (B, S) each
            with autocast():
                logits, _ = net(x)  # (B, S, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            # The loss shown is the whole step's (every rank's windows), not rank 0's: summed over
            # ranks while backward runs (equal batches per rank, so the mean of the ranks' means).
            shown = loss.detach().clone()
            summing = dist.all_reduce(shown, async_op=True) if d.enabled else None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            if not math.isfinite(gnorm):  # the same all-reduced gradients on every rank
                report.close()
                raise TrainError(
                    f"the gradient became {gnorm} at step {step} (loss {loss.item():.4g}); lower --lr "
                    "or --grad-clip. The last checkpoint is unchanged"
                )
            optimizer.step()
            tokens_seen += tokens_per_step
            if summing is not None:
                summing.wait()
            report.step(step, shown.item() / d.world_size, lr, gnorm)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                evals.append((step, evaluate(model, eval_windows, device, autocast, d)))
                report.line(f"step {step}/{stop} | eval loss {evals[-1][1]:.4f}")
                report.restart_clock()
            if (cfg.save_every and step % cfg.save_every == 0) or step == stop:
                checkpoint(step)
                report.restart_clock()
    except BaseException:
        report.close()
        raise
    elapsed = time.perf_counter() - t_run
    report.close()
    tok_s = (step - start) * tokens_per_step / max(report.total_s, 1e-9)
    first = f"{evals[0][1]:.4f} (step {evals[0][0]})" if evals else "n/a"
    last = f"{evals[-1][1]:.4f} (step {evals[-1][0]})" if evals else "n/a"
    report.line(
        f"trained steps {start}..{step} in {elapsed:.1f} s ({tok_s:,.0f} tok/s while training); "
        f"eval loss {first} -> {last}; checkpoint {out}"
    )
    return TrainResult(model=model, step=step, evals=evals, tokens_per_s=tok_s, output=out)


def _note_changes(state: dict, cfg: TrainConfig, d: Dist, report: _Reporter, data_id: dict | None = None) -> None:
    """Say what a resumed run continues with: the checkpoint's options, and every explicit option
    (or the process count) that differs from the checkpoint, the data file's contents included."""
    saved = dict(state.get("args", {}), world_size=state.get("world_size"))
    now = dict(cfg.hyperparameters(), world_size=d.world_size)
    report.line(f"resuming {cfg.output} at step {state['step']} with the checkpoint's options except "
                f"those given: " + ", ".join(f"{k}={now[k]}" for k in RESUMED_OPTIONS if k != "data"))
    for k, v in now.items():
        if k in saved and saved[k] != v:
            report.line(f"note: {k} is {v} now, {saved[k]} in the checkpoint; continuing with {v}")
    if cfg.preset is not None:
        report.line(f"note: --preset {cfg.preset} is ignored; the model comes from {cfg.output}")
    then = state.get("data")  # absent in checkpoints written before it was recorded
    if data_id is not None and isinstance(then, dict) and then != data_id and saved.get("data") == now["data"]:
        report.line(f"note: data file {cfg.data} changed since the checkpoint ({then.get('bytes')} bytes then, "
                    f"{data_id['bytes']} now); the windows differ from those of an uninterrupted run")


# --- command line ----------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `train` options (used by `xlstm-export train` and `python -m xlstm_export.train`).

    The options in RESUMED_OPTIONS default to None here: left out, a fresh run takes TrainConfig's
    default and a resumed run the checkpoint's value (``config_from_args`` records which were given).
    """
    dflt = TrainConfig(data="", output="")
    kept = "; --resume: the checkpoint's"

    def opt(flag: str, typ, help_text: str) -> None:
        name = flag[2:].replace("-", "_")
        p.add_argument(flag, type=typ, default=None, help=f"{help_text} (default {getattr(dflt, name)}{kept})")

    p.add_argument("--data", default=None,
                   help="training text file; its bytes are the tokens (required, except with --resume: the checkpoint's)")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory (config.json, "
                   f"model.safetensors, {TRAINER_STATE_NAME})")
    p.add_argument("--preset", default=None, help="model preset for a fresh run (default: tiny)")
    opt("--steps", int, "total optimizer steps")
    opt("--seq-len", int, "tokens per window")
    opt("--batch-size", int, "windows per step and per process")
    opt("--lr", float, "peak learning rate")
    opt("--min-lr", float, "learning rate at the last step")
    opt("--warmup", int, "linear warmup steps")
    opt("--weight-decay", float, "AdamW weight decay on weight matrices")
    opt("--grad-clip", float, "max gradient norm, 0 = off")
    opt("--eval-every", int, "steps between eval losses")
    opt("--eval-batches", int, "validation batches per eval")
    opt("--save-every", int, "steps between checkpoints, 0 = only at the end")
    opt("--log-every", int, "steps between log lines without a progress bar")
    opt("--val-fraction", float, "tail of the file held out for eval, 0 = eval on the training text")
    opt("--seed", int, "init and data seed")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--backend", default=None, help="cell backend for this run: auto, torch, triton (default: the config's)")
    p.add_argument("--tokenizer", choices=["bytes"], default="bytes", help="byte-level tokens (vocab 256)")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in -o exactly, with its saved options unless given here")
    p.add_argument("--overwrite", action="store_true", help="start over, replacing the checkpoint in -o")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (after saving) at this step; the schedule still spans --steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar or step lines")
    p.add_argument("--dist-timeout", type=float, default=dflt.dist_timeout, metavar="MINUTES",
                   help="under torchrun, how long a process waits for the others in a collective, e.g. "
                        "while rank 0 writes a checkpoint (default %(default)g; NCCL's own is 10)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed arguments; RESUMED_OPTIONS left out (None) are not passed and
    ``given`` names the ones that were."""
    names = {f for f in TrainConfig.__dataclass_fields__} - {"given"}
    values = {k: v for k, v in vars(args).items() if k in names}
    given = frozenset(k for k in RESUMED_OPTIONS if values.get(k) is not None)
    values = {k: v for k, v in values.items() if k not in RESUMED_OPTIONS or k in given}
    return TrainConfig(**{"data": None, **values}, given=given)


class Terminated(KeyboardInterrupt):
    """SIGTERM (torchrun stopping its workers, a batch scheduler's preemption, ``kill``) raised as an
    exception, so a checkpoint being written is cleaned up and the previous one stays in place."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (in the main thread; elsewhere nothing changes)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _out_of_memory(e: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError or the CPU allocator's RuntimeError."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))


def run_train(args: argparse.Namespace) -> int:
    """`xlstm-export train`: 0 on success, 2 with one line on stderr for bad input (or too little
    memory for the options), 130 on Ctrl-C and 143 on SIGTERM, the last checkpoint unchanged."""
    d = dist_from_env()
    rank = d.rank
    debug = getattr(args, "debug", False)
    try:
        with _sigterm_raises():
            train(config_from_args(args))
    except TrainError as e:
        if debug:
            raise
        if rank == 0:
            print(f"xlstm-export train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as e:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        if rank == 0:
            print(f"xlstm-export train: {what}; the last checkpoint is unchanged", file=sys.stderr, flush=True)
        return code
    except Exception as e:
        if debug or not _out_of_memory(e):
            raise
        # Every rank that runs out says so, not rank 0 alone: the bad input above fails alike on every
        # rank, but memory runs out on one GPU (another process on it, a fuller one), and a rank > 0
        # that exited 2 without a word left only torchrun's summary of its exit code (it shows no
        # reason for a worker not wrapped in torch.distributed.elastic's @record).
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        who = f" (rank {rank})" if d.enabled else ""
        print(f"xlstm-export train: error{who}: out of memory ({first}); lower --batch-size, --seq-len or "
              "--eval-batches. The last checkpoint is unchanged", file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xlstm-export train",
        description="Train an xLSTM language model on a text file (byte tokens); runs under torchrun.",
    )
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
