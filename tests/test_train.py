"""The trainer (xlstm_export/train.py): loss goes down, checkpoints load, resume is exact, DDP runs,
bad input ends in one line and exit code 2.

CPU only and small: the tiny preset (~0.4M parameters) on windows of 16 bytes. Every run is seeded,
so the numbers below are deterministic on one machine.
"""

from __future__ import annotations

import datetime
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from xlstm_export import train as T
from xlstm_export.models import config as model_config
from xlstm_export.models import preset, xLSTMLM

TEXT = "the quick brown fox jumps over the lazy dog. " * 40  # 1,800 bytes, very repetitive
SMALL = dict(seq_len=16, batch_size=8, lr=5e-3, min_lr=5e-4, warmup=2, eval_batches=2, quiet=True)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


def run(data, out, **kw) -> T.TrainResult:
    cfg = T.TrainConfig(data=str(data), output=str(out), **{**SMALL, **kw})
    with torch.random.fork_rng():  # keep the test process's global RNG as it was
        return T.train(cfg)


@pytest.fixture(scope="module")
def trained(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ckpt"
    return run(data_file, out, steps=10, eval_every=5), out


# --- a short run ------------------------------------------------------------------------------------
def test_loss_goes_down(trained):
    result, _ = trained
    steps = [s for s, _ in result.evals]
    assert steps == [0, 5, 10]
    first, last = result.evals[0][1], result.evals[-1][1]
    # An untrained byte model predicts nearly uniformly over 256 symbols: loss ~ ln 256 = 5.55.
    assert abs(first - math.log(256)) < 0.5, first
    # One repeated sentence is learned fast: measured 5.84 -> 0.66 after 10 steps; ask for 2 nats less.
    assert last < first - 2.0, result.evals
    assert result.step == 10


def test_checkpoint_is_a_model_directory_with_the_same_logits(trained):
    result, out = trained
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     T.TRAINER_STATE_NAME]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "staging left behind"
    loaded = xLSTMLM.from_pretrained(out)
    assert loaded.config == preset("tiny")  # the portable config: backend stays "auto"
    ids = torch.tensor([list(b"the quick brown "), list(b"over the lazy do")])  # (2, 16)
    with torch.no_grad():
        want, want_state = result.model.eval()(ids)  # (2, 16, 256)
        got, got_state = loaded(ids)
    # Same float32 weights, same code, same CPU: bit-identical.
    assert torch.equal(got, want)
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    # ... and the trained model is not the initial one.
    torch.manual_seed(0)
    fresh = xLSTMLM(preset("tiny"))
    assert not torch.equal(fresh.lm_head.weight, loaded.lm_head.weight)


def test_trainer_state_loads_with_weights_only(trained):
    result, out = trained
    state = torch.load(out / T.TRAINER_STATE_NAME, weights_only=True)
    assert state["format"] == T.TRAINER_STATE_FORMAT and state["version"] == T.TRAINER_STATE_VERSION
    assert state["step"] == 10 and state["world_size"] == 1
    assert state["tokens_seen"] == 10 * SMALL["batch_size"] * SMALL["seq_len"]
    assert state["schedule"] == {"name": "warmup_cosine", "lr": 5e-3, "min_lr": 5e-4, "warmup": 2, "steps": 10}
    n_params = len(list(result.model.parameters()))
    assert len(state["optimizer"]["state"]) == n_params
    assert all(int(s["step"]) == 10 for s in state["optimizer"]["state"].values())
    assert state["rng"]["torch"].dtype == torch.uint8
    assert [s for s, _ in state["evals"]] == [0, 5, 10]


def test_a_warmup_longer_than_the_run_is_named(data_file, tmp_path, capsys):
    """The default --warmup (100) in a short run keeps the learning rate far below --lr: said so."""
    run(data_file, tmp_path / "short", steps=2, warmup=5, eval_every=2, batch_size=4, eval_batches=1)
    assert "note: --warmup 5 >= --steps 2: the learning rate only reaches 0.002 of --lr 0.005" in capsys.readouterr().out


# --- resume -----------------------------------------------------------------------------------------
def test_resume_equals_straight_run(data_file, tmp_path, capsys):
    """`train -o DIR --resume` with every option left out (the data file too) continues with the
    saved run's options, exactly as the uninterrupted run."""
    kw = dict(steps=6, eval_every=3, batch_size=4, eval_batches=1)
    run(data_file, tmp_path / "straight", **kw)
    part = run(data_file, tmp_path / "split", stop_at=3, **kw)
    assert part.step == 3
    assert torch.load(tmp_path / "split" / T.TRAINER_STATE_NAME, weights_only=True)["step"] == 3
    capsys.readouterr()
    with torch.random.fork_rng():
        assert T.main(["-o", str(tmp_path / "split"), "--resume", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "note:" not in out, out  # nothing changed ...
    assert "seq_len=16, batch_size=4, lr=0.005, min_lr=0.0005, warmup=2" in out, out  # ... and it says so

    w_straight = load_file(tmp_path / "straight" / "model.safetensors")
    w_resumed = load_file(tmp_path / "split" / "model.safetensors")
    assert w_straight.keys() == w_resumed.keys()
    for k in w_straight:
        # The same windows, learning rates and optimizer moments in the same order on one CPU:
        # expected bit-identical; 1e-6 leaves room only for a different BLAS reduction order.
        torch.testing.assert_close(w_resumed[k], w_straight[k], rtol=1e-6, atol=1e-6, msg=k)
    s_straight = torch.load(tmp_path / "straight" / T.TRAINER_STATE_NAME, weights_only=True)
    s_resumed = torch.load(tmp_path / "split" / T.TRAINER_STATE_NAME, weights_only=True)
    assert s_resumed["step"] == s_straight["step"] == 6
    assert s_resumed["tokens_seen"] == s_straight["tokens_seen"]
    for i, st in s_straight["optimizer"]["state"].items():
        assert int(s_resumed["optimizer"]["state"][i]["step"]) == int(st["step"]) == 6
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s_resumed["optimizer"]["state"][i][name], st[name], rtol=1e-6, atol=1e-8)
    assert [s for s, _ in s_resumed["evals"]] == [s for s, _ in s_straight["evals"]] == [0, 3, 6]
    for (_, a), (_, b) in zip(s_resumed["evals"], s_straight["evals"]):
        assert a == pytest.approx(b, rel=1e-5)

    assert s_resumed["args"] == s_straight["args"]

    # Resuming a finished run is a no-op, not an error.
    again = run(data_file, tmp_path / "split", resume=True, **kw)
    assert again.step == 6

    # An explicit option wins and is named; those left out stay the checkpoint's.
    with torch.random.fork_rng():
        assert T.main(["-o", str(tmp_path / "split"), "--resume", "--quiet", "--steps", "7", "--lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "note: steps is 7 now, 6 in the checkpoint; continuing with 7" in out, out
    assert "note: lr is 0.001 now, 0.005 in the checkpoint; continuing with 0.001" in out, out
    assert out.count("note:") == 2, out
    state = torch.load(tmp_path / "split" / T.TRAINER_STATE_NAME, weights_only=True)
    assert state["step"] == 7 and (state["args"]["seq_len"], state["args"]["batch_size"]) == (16, 4)
    assert state["schedule"] == {"name": "warmup_cosine", "lr": 1e-3, "min_lr": 5e-4, "warmup": 2, "steps": 7}
    _fails(capsys, ["-o", str(tmp_path / "fresh"), "--quiet"], "--data is required")  # a fresh run needs it


# --- pieces -----------------------------------------------------------------------------------------
def test_lr_schedule():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup=10, steps=100)
    lrs = [T.lr_at(s, **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine: never rises after warmup
    assert lrs[-1] == pytest.approx(1e-4)
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 45 / 89)))
    assert T.lr_at(3, lr=1e-3, min_lr=0.0, warmup=0, steps=1) == 1e-3  # no decay span: the peak


def test_weight_decay_on_matrices_only():
    model = xLSTMLM(preset("tiny"))
    decay, no_decay = T.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed.isdisjoint(kept) and decayed | kept == set(names.values())
    assert {"lm_head.weight", "blocks.0.proj_up.weight", "blocks.0.q_proj.weight", "blocks.1.r"} <= decayed
    assert {"embedding.weight", "blocks.0.conv.weight", "blocks.0.norm.weight", "blocks.0.igate.bias",
            "blocks.0.learnable_skip", "blocks.1.b"} <= kept
    assert all(p.dim() >= 2 for p in decay["params"])


def test_windows_per_rank_and_step():
    tokens = torch.arange(200, dtype=torch.uint8)  # (200,) distinct values: windows name their start
    def windows(rank, step):
        return T.sample_windows(tokens, 4, 16, T.window_generator(7, 0, rank, step))
    x, y = windows(0, 3)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    assert torch.equal(windows(0, 3)[0], x)  # a step's windows are a function of (seed, rank, step)
    assert not torch.equal(windows(1, 3)[0], x)  # each rank its own windows
    assert not torch.equal(windows(0, 4)[0], x)


def test_split_keeps_one_window_for_validation():
    tokens = torch.zeros(100, dtype=torch.uint8)
    train, val = T.split_train_val(tokens, seq_len=16, val_fraction=0.1)
    assert (train.numel(), val.numel()) == (83, 17)  # 10% is 10 bytes < one window of 17
    train, val = T.split_train_val(tokens, seq_len=4, val_fraction=0.1)
    assert (train.numel(), val.numel()) == (90, 10)
    with pytest.raises(T.TrainError, match="too short for a training split"):
        T.split_train_val(tokens, seq_len=60, val_fraction=0.1)
    train, val = T.split_train_val(tokens, seq_len=60, val_fraction=0.0)
    assert train.numel() == val.numel() == 100


# --- DDP --------------------------------------------------------------------------------------------
def test_ddp_two_processes_on_cpu(data_file, tmp_path):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "xlstm_export.train", "--data", str(data_file), "-o", str(out), "--device", "cpu",
        "--steps", "3", "--seq-len", "16", "--batch-size", "2", "--eval-every", "3", "--eval-batches", "2",
        "--warmup", "1", "--lr", "3e-3", "--log-every", "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("trained steps 0..3") == 1, proc.stdout  # only rank 0 logs
    assert "cpu, 2 processes" in proc.stdout
    assert "step 3/3 | loss" in proc.stdout  # not a terminal: log lines instead of a bar
    # The loss shown is the step's over both ranks' windows, not rank 0's alone: step 1 from the
    # initial weights, each rank's windows drawn from its own (seed, rank, step) stream.
    train_tokens, _ = T.split_train_val(T.read_bytes(str(data_file)), 16, 0.1)
    torch.manual_seed(0)
    model = xLSTMLM(preset("tiny")).train()
    losses = []
    with torch.no_grad():
        for rank in range(2):
            x, y = T.sample_windows(train_tokens, 2, 16, T.window_generator(0, 0, rank, 0))
            losses.append(F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item())
    mean = f"{sum(losses) / 2:.4f}"
    assert mean != f"{losses[0]:.4f}"  # the check below can tell the two apart
    assert f"step 1/3 | loss {mean} |" in proc.stdout, (losses, proc.stdout)
    state = torch.load(out / T.TRAINER_STATE_NAME, weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 3
    assert state["tokens_seen"] == 3 * 2 * 16 * 2  # steps * batch * seq_len * ranks
    model = xLSTMLM.from_pretrained(out)
    torch.manual_seed(0)
    assert not torch.equal(model.lm_head.weight, xLSTMLM(preset("tiny")).lm_head.weight)


def test_on_cpu_copies_every_tensor_of_a_state_dict():
    """The optimizer state goes into trainer_state.pt through on_cpu: every tensor, at any depth
    of dicts, lists and tuples, becomes a CPU tensor of the same values; the rest is kept."""

    class Elsewhere(torch.Tensor):  # stands in for a GPU tensor: .cpu() gives a plain one
        def cpu(self, *args, **kwargs):
            return self.as_subclass(torch.Tensor).clone()

    def away(t):
        return t.clone().as_subclass(Elsewhere)

    a, b, c = torch.randn(3), torch.randn(2, 2), torch.tensor(7.0)
    state = {"state": {0: {"step": away(c), "exp_avg": away(a)}, 1: {"exp_avg": b}},
             "param_groups": [{"lr": 0.1, "params": [0, 1], "betas": (0.9, away(a))}]}
    got = T.on_cpu(state)
    assert type(got["state"][0]["exp_avg"]) is torch.Tensor and torch.equal(got["state"][0]["exp_avg"], a)
    assert type(got["state"][0]["step"]) is torch.Tensor and torch.equal(got["state"][0]["step"], c)
    assert got["state"][1]["exp_avg"] is b  # already on the CPU: not copied
    betas = got["param_groups"][0]["betas"]
    assert isinstance(betas, tuple) and betas[0] == 0.9 and type(betas[1]) is torch.Tensor
    assert got["param_groups"][0]["params"] == [0, 1] and got["param_groups"][0]["lr"] == 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_run_saves_its_optimizer_state_on_the_cpu(data_file, tmp_path):
    """trainer_state.pt of a CUDA run loads without map_location on any machine (every tensor in it
    on the CPU), and --resume on the GPU takes it back and continues."""
    out = tmp_path / "gpu"
    run(data_file, out, steps=4, stop_at=2, eval_every=2, device="cuda")
    state = torch.load(out / T.TRAINER_STATE_NAME, weights_only=True)
    tensors = [v for st in state["optimizer"]["state"].values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert run(data_file, out, steps=4, eval_every=2, device="cuda", resume=True).step == 4
    state = torch.load(out / T.TRAINER_STATE_NAME, weights_only=True)
    assert all(int(st["step"]) == 4 for st in state["optimizer"]["state"].values())


def test_the_cuda_device_is_made_current_alone_and_under_ddp(monkeypatch):
    """The Triton kernels launch on torch.cuda.current_device(), not on their tensors' device: a
    single process given --device cuda:1 made no device current (only DDP did), so the kernels ran
    on GPU 0 with GPU 1's pointers. CUDA faked: which device each case makes current."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: current.append(torch.device(dev)))
    assert T.resolve_device("cuda:1", T.Dist()) == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]
    assert T.resolve_device(None, T.Dist(rank=3, world_size=4, local_rank=1)) == torch.device("cuda", 1)
    assert current[-1] == torch.device("cuda", 1)  # LOCAL_RANK, not RANK
    assert T.resolve_device("cpu", T.Dist()) == torch.device("cpu") and len(current) == 2
    # under torchrun an index is LOCAL_RANK's or refused (each rank would take that one GPU)
    assert T.resolve_device("cuda:1", T.Dist(rank=1, world_size=2, local_rank=1)) == torch.device("cuda", 1)
    with pytest.raises(T.TrainError, match="LOCAL_RANK .this one: cuda:1.; give --device cuda"):
        T.resolve_device("cuda:0", T.Dist(rank=1, world_size=2, local_rank=1))


def test_the_process_group_is_destroyed_after_success_only(data_file, tmp_path, monkeypatch):
    """destroy_process_group on the way out of an exception: with NCCL it flushes the collectives the
    other ranks wait in, so a rank that ran out of memory alone hung there instead of exiting (and
    saying why). Rank 0 of 2, the process group faked: destroyed after a run, not after an error."""
    import torch.distributed as dist

    destroyed, inits = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: inits.append((backend, timeout)))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: destroyed.append(True))

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(T, "_loop", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        run(data_file, tmp_path / "a", steps=2, device="cpu")
    assert destroyed == []
    monkeypatch.setattr(T, "_loop", lambda *args: "trained")
    assert run(data_file, tmp_path / "b", steps=2, device="cpu", dist_timeout=90) == "trained"
    assert destroyed == [True]
    # the collectives' timeout: 60 minutes unless --dist-timeout says otherwise (NCCL's own is 10,
    # less than rank 0 may take to write a large model's checkpoint while the others wait)
    assert inits == [("gloo", datetime.timedelta(minutes=60)), ("gloo", datetime.timedelta(minutes=90))]


# --- bad input --------------------------------------------------------------------------------------
def _fails(capsys, argv, match):
    rc = T.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xlstm-export train: error: "), err
    assert match in lines[0], err
    assert "Traceback" not in err


def _argv(data, out, *extra):
    return ["--data", str(data), "-o", str(out), "--steps", "2", "--seq-len", "16", "--quiet", *extra]


def test_missing_empty_and_short_data(tmp_path, capsys):
    _fails(capsys, _argv(tmp_path / "nope.txt", tmp_path / "o"), "does not exist")
    _fails(capsys, _argv(tmp_path, tmp_path / "o"), "is a directory")
    (tmp_path / "empty.txt").write_bytes(b"")
    _fails(capsys, _argv(tmp_path / "empty.txt", tmp_path / "o"), "is empty")
    (tmp_path / "short.txt").write_bytes(b"x" * 16)  # seq_len + 1 = 17 needed
    _fails(capsys, _argv(tmp_path / "short.txt", tmp_path / "o"), "shorter than one training window")
    assert not (tmp_path / "o").exists()


def test_bad_output_directories(data_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _fails(capsys, _argv(data_file, blocker / "out"), "cannot create the parent")
    _fails(capsys, _argv(data_file, blocker), "is not a directory")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    _fails(capsys, _argv(data_file, busy), "not a checkpoint")
    _fails(capsys, _argv(data_file, tmp_path / "fresh", "--resume"), "holds no checkpoint")
    assert (busy / "notes.txt").read_text() == "mine"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / T.TRAINER_STATE_NAME).write_bytes(b"not a pickle")
    _fails(capsys, _argv(data_file, broken, "--resume"), "not a readable trainer state")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_parent(data_file, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _fails(capsys, _argv(data_file, ro / "out"), "not writable")
    finally:
        ro.chmod(0o700)


def test_existing_checkpoint_needs_resume_or_overwrite(trained, data_file, capsys):
    _, out = trained
    _fails(capsys, _argv(data_file, out), "pass --resume")


def test_bad_options(data_file, tmp_path, capsys, monkeypatch):
    _fails(capsys, _argv(data_file, tmp_path / "o", "--preset", "nope"), "unknown preset")
    monkeypatch.setitem(model_config.PRESETS, "tiny-v100", preset("tiny", vocab_size=100))
    _fails(capsys, _argv(data_file, tmp_path / "o", "--preset", "tiny-v100"), "vocab_size 100")
    _fails(capsys, _argv(data_file, tmp_path / "o", "--lr", "0"), "--lr must be > 0")
    _fails(capsys, _argv(data_file, tmp_path / "o", "--stop-at", "5"), "--stop-at")
    _fails(capsys, _argv(data_file, tmp_path / "o", "--backend", "nope"), "not a cell backend")
    _fails(capsys, _argv(data_file, tmp_path / "o", "--device", "tpu"), "--device")


def test_command_line_error_has_no_traceback(tmp_path):
    """The real entry point, in a fresh process: one line on stderr, exit code 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "xlstm_export.train", "--data", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"xlstm-export train: error: data file {tmp_path / 'missing.txt'} does not exist"
    ]


def test_non_finite_rates_and_out_of_range_seed_are_refused(data_file, tmp_path, capsys):
    """An infinite --lr or --weight-decay made every weight inf/nan at the first step (and a run of
    one step saved that checkpoint); a seed past 64 bits was torch's 'Overflow when unpacking long
    long' (a traceback under `python -m xlstm_export.train`)."""
    _fails(capsys, _argv(data_file, tmp_path / "o", "--lr", "inf"), "--lr must be > 0 and finite, got inf")
    for bad in ("0", "-5", "nan", "inf"):
        _fails(capsys, _argv(data_file, tmp_path / "o", "--dist-timeout", bad), "--dist-timeout must be > 0 minutes")
    _fails(capsys, _argv(data_file, tmp_path / "o", "--weight-decay", "inf"), "--weight-decay must be >= 0 and finite")
    _fails(capsys, _argv(data_file, tmp_path / "o", "--seed", str(2**64)), "--seed must lie in [0, 2**64 - 1]")
    assert not (tmp_path / "o").exists()


def test_export_only_backend_is_refused_before_training(data_file, tmp_path, capsys):
    """--backend custom_op (the ONNX exporter's opaque nodes) has no backward: it failed at the first
    step with torch's 'no autograd formula was registered' after the step-0 eval."""
    _fails(capsys, _argv(data_file, tmp_path / "o", "--backend", "custom_op"), "--backend custom_op has no backward")


def test_output_that_is_the_current_directory_is_refused(data_file, tmp_path, capsys, monkeypatch):
    """`-o .` in an empty folder trained every step, then failed to swap '.' for the checkpoint
    ('Device or resource busy'): the whole run lost. Now refused before training."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    _fails(capsys, _argv(data_file, "."), "is the current directory or holds it")
    _fails(capsys, _argv(data_file, ".."), "is the current directory or holds it")
    assert not any(here.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_symlinked_output_writes_into_the_link_target(data_file, tmp_path):
    """-o LINK (a symlink to a folder) replaced the link by a new folder, left the target empty and
    the old link behind as .LINK.*.tmp.old. The checkpoint now goes where the link points."""
    target = tmp_path / "disk" / "run"
    target.mkdir(parents=True)
    link = tmp_path / "run"
    link.symlink_to(target, target_is_directory=True)
    result = run(data_file, link, steps=1, batch_size=2, eval_batches=1, eval_every=1)
    assert result.output == target
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / T.TRAINER_STATE_NAME).is_file() and (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "run"]  # no staging or .old left
    assert sorted(p.name for p in target.parent.iterdir()) == ["run"]


SIGTERM_DURING_SAVE = r"""
import os, signal, sys
import xlstm_export.models.io as mio
from xlstm_export import train as T

write = mio.write_pretrained
calls = []

def write_then_terminate(model, stage):
    write(model, stage)
    calls.append(stage)
    if len(calls) == 2:  # inside the second checkpoint's staging: killed as torchrun / a scheduler would
        os.kill(os.getpid(), signal.SIGTERM)

mio.write_pretrained = write_then_terminate
sys.exit(T.main(sys.argv[1:]))
"""


def test_sigterm_during_a_checkpoint_keeps_the_previous_one(data_file, tmp_path, capsys):
    """SIGTERM (torchrun stopping its workers, a scheduler's preemption) killed the process at once:
    a checkpoint being written left its staging folder beside DIR (and between the two renames of the
    swap, no DIR at all). Now it ends like Ctrl-C: staging removed, the previous checkpoint in place,
    one line, exit 143, and the run resumes from it."""
    out = tmp_path / "ckpt"
    argv = [*_argv(data_file, out), "--steps", "3", "--save-every", "1", "--batch-size", "2",
            "--eval-batches", "1", "--warmup", "1"]
    proc = subprocess.run([sys.executable, "-c", SIGTERM_DURING_SAVE, *argv], capture_output=True, text=True,
                          timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines() == [
        "xlstm-export train: terminated (SIGTERM); the last checkpoint is unchanged"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "staging left behind"
    assert torch.load(out / T.TRAINER_STATE_NAME, weights_only=True)["step"] == 1
    with torch.random.fork_rng():
        assert T.main(["-o", str(out), "--resume", "--quiet"]) == 0
    assert torch.load(out / T.TRAINER_STATE_NAME, weights_only=True)["step"] == 3


def test_out_of_memory_is_one_line(data_file, tmp_path, capsys, monkeypatch):
    """An absurd --batch-size ran out of memory with the CPU allocator's RuntimeError: a traceback
    under `python -m xlstm_export.train` / torchrun."""
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 65536000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(T, "sample_windows", no_memory)
    _fails(capsys, _argv(data_file, tmp_path / "o", "--batch-size", "1000000"),
           "out of memory ([enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate")


def test_out_of_memory_on_a_rank_other_than_0_is_said(data_file, tmp_path, capsys, monkeypatch):
    """Only rank 0 printed errors: memory runs out on one GPU, and a rank > 0 that ran out exited 2
    without a word (torchrun's summary shows the exit code only). Rank 1 of 2, faked."""
    def no_memory(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 1)")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(T, "train", no_memory)
    assert T.main(_argv(data_file, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["xlstm-export train: error (rank 1): out of memory (CUDA out of memory. Tried to allocate "
                   "20.00 GiB (GPU 1)); lower --batch-size, --seq-len or --eval-batches. The last checkpoint "
                   "is unchanged"], err


def test_trainer_state_without_its_fields_is_one_line(trained, tmp_path, capsys):
    """A trainer_state.pt of the right format and version but missing a field (edited, or copied
    from elsewhere) was a KeyError traceback on --resume."""
    import shutil

    _, out = trained
    for key, message in (("step", "no valid 'step'"), ("rng", "no valid 'rng'"), ("args", "no valid 'args'")):
        bad = tmp_path / key
        shutil.copytree(out, bad)
        state = torch.load(bad / T.TRAINER_STATE_NAME, weights_only=True)
        if key == "rng":
            state["rng"] = {"cuda": []}
        else:
            del state[key]
        torch.save(state, bad / T.TRAINER_STATE_NAME)
        _fails(capsys, ["-o", str(bad), "--resume", "--quiet"], message)


def test_resume_names_a_data_file_whose_bytes_changed(tmp_path, capsys):
    """The same --data path with other bytes (text appended, the file regenerated) resumed silently
    with other windows and another validation split: not the run that was interrupted."""
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "ckpt"
    run(data, out, steps=2, stop_at=1, batch_size=2, eval_batches=1, eval_every=2)
    assert T.load_trainer_state(out)["data"] == T.data_fingerprint(T.read_bytes(data))
    data.write_text(TEXT + "and a new paragraph. " * 10)
    capsys.readouterr()
    with torch.random.fork_rng():
        assert T.main(["-o", str(out), "--resume", "--quiet", "--stop-at", "1"]) == 0  # nothing to do: no note
        assert "note:" not in capsys.readouterr().out
        assert T.main(["-o", str(out), "--resume", "--quiet"]) == 0
    out_text = capsys.readouterr().out
    assert f"note: data file {data.resolve()} changed since the checkpoint (1800 bytes then, 2010 now)" in out_text, out_text


def test_resume_names_a_checkpoint_stranded_by_a_killed_swap(trained, tmp_path, capsys):
    """A save killed outright between the two renames of the swap leaves no DIR, the previous
    checkpoint as .DIR.*.tmp.old and the new one as .DIR.*.tmp beside it: --resume only said 'holds no
    checkpoint'. It now names the folder holding the newest whole checkpoint."""
    import shutil

    _, out = trained
    ckpt = tmp_path / "ckpt[1]"  # a glob character in the name too
    older = tmp_path / ".ckpt[1].ab12cd.tmp.old"
    newer = tmp_path / ".ckpt[1].ab12cd.tmp"
    shutil.copytree(out, older)
    shutil.copytree(out, newer)
    state = torch.load(newer / T.TRAINER_STATE_NAME, weights_only=True)
    state["step"] = 11
    torch.save(state, newer / T.TRAINER_STATE_NAME)
    partial = tmp_path / ".ckpt[1].zz99zz.tmp"  # killed while writing: no trainer state yet
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    _fails(capsys, ["-o", str(ckpt), "--resume", "--quiet"],
           f"holds no checkpoint (config.json + {T.TRAINER_STATE_NAME}); a save killed while swapping it in "
           f"left the checkpoint of step 11 in {newer}: move that folder to {ckpt} and resume")
    _fails(capsys, ["-o", str(tmp_path / "other"), "--resume", "--quiet"], "holds no checkpoint (config.json")


def test_resume_refuses_moments_of_other_shapes(trained, tmp_path, capsys):
    """Weights of another shape with a trainer state holding as many parameters: load_state_dict
    took it and AdamW failed at the first step ('The size of tensor a (128) must match ...')."""
    import shutil

    from xlstm_export.models.io import write_pretrained

    _, out = trained
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    torch.manual_seed(0)
    write_pretrained(xLSTMLM(preset("tiny", embedding_dim=64)), mixed)
    shutil.copy(out / T.TRAINER_STATE_NAME, mixed / T.TRAINER_STATE_NAME)
    _fails(capsys, ["-o", str(mixed), "--resume", "--quiet", "--steps", "12"],
           "optimizer state does not fit the model (exp_avg of ")
    assert T.load_trainer_state(mixed)["step"] == 10  # nothing written


def test_resume_and_overwrite_never_delete_files_put_into_the_checkpoint(trained, data_file, tmp_path, capsys,
                                                                         monkeypatch):
    """Every save replaces DIR whole: --resume / --overwrite of a checkpoint holding a user's notes (or
    the training text itself, --data DIR/corpus.txt) deleted them at the first save, silently. Now
    refused before training, and a file put into DIR during the run stops the run at the next save
    instead of being deleted."""
    import shutil

    _, out = trained
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out, ckpt)
    (ckpt / "notes.txt").write_text("mine")
    shutil.copy(data_file, ckpt / "corpus.txt")
    _fails(capsys, ["-o", str(ckpt), "--resume", "--quiet", "--steps", "12", "--data", str(ckpt / "corpus.txt")],
           f"output {ckpt} holds what a checkpoint does not (corpus.txt, notes.txt); every save replaces")
    _fails(capsys, _argv(data_file, ckpt, "--overwrite"), "holds what a checkpoint does not (corpus.txt, notes.txt)")
    assert (ckpt / "notes.txt").read_text() == "mine" and (ckpt / "corpus.txt").is_file()
    assert T.load_trainer_state(ckpt)["step"] == 10

    # A file dropped in while the run goes on: the save refuses, the file and the last checkpoint stay.
    (ckpt / "notes.txt").unlink()
    (ckpt / "corpus.txt").unlink()
    evaluate = T.evaluate

    def evaluate_then_drop_a_file(*args, **kwargs):
        (ckpt / "late.txt").write_text("mine too")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(T, "evaluate", evaluate_then_drop_a_file)
    _fails(capsys, ["-o", str(ckpt), "--resume", "--quiet", "--steps", "11", "--eval-every", "1"],
           f"cannot write checkpoint {ckpt}: it now holds what a checkpoint does not (late.txt)")
    assert (ckpt / "late.txt").read_text() == "mine too"
    assert T.load_trainer_state(ckpt)["step"] == 10


def test_interrupt_ends_the_progress_bar_before_its_line(data_file, tmp_path, capsys, monkeypatch):
    """On a terminal, Ctrl-C (or any error) mid-run left the bar open: 'xlstm-export train:
    interrupted; ...' was glued to the bar's last render, and the bar was drawn again after it."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    sample, calls = T.sample_windows, []

    def interrupt_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1 + 3:  # one eval window, then one call per step
            raise KeyboardInterrupt
        return sample(*args, **kwargs)

    monkeypatch.setattr(T, "sample_windows", interrupt_at_step_3)
    argv = ["--data", str(data_file), "-o", str(tmp_path / "o"), "--steps", "5", "--seq-len", "16",
            "--batch-size", "2", "--eval-batches", "1", "--warmup", "1"]
    with torch.random.fork_rng():
        assert T.main(argv) == 130
    err = capsys.readouterr().err
    assert "2/5" in err, err  # the bar was drawn
    assert err.endswith("\nxlstm-export train: interrupted; the last checkpoint is unchanged\n"), repr(err[-300:])


def test_a_small_lr_alone_names_the_default_min_lr(data_file, tmp_path, capsys):
    """--lr 3e-5 (a usual fine-tuning rate) without --min-lr was refused as '--min-lr must lie in
    [0, --lr=3e-05], got 0.0001': an option the user never gave. Now the message says where the
    value came from and what to pass."""
    _fails(capsys, _argv(data_file, tmp_path / "o", "--lr", "3e-5"),
           "--lr 3e-05 is below --min-lr 0.0001 (the default, or the checkpoint's); pass a --min-lr <= --lr too, "
           "e.g. --min-lr 3e-06")
    _fails(capsys, _argv(data_file, tmp_path / "o", "--lr", "3e-5", "--min-lr", "1e-4"),
           "--min-lr must lie in [0, --lr=3e-05], got 0.0001")  # given explicitly: the plain range



def test_a_second_run_on_the_same_output_fails_at_once(data_file, tmp_path, capsys):
    """Two runs with one -o would alternate their saves in the folder: the second finds the first's
    lock (.NAME.lock beside the folder, held for the whole run) and stops before training. Once
    the lock is free, a run proceeds, and releases it at its end."""
    out = tmp_path / "out"
    with T.output_lock(out, True):  # the first run, mid-training
        assert (tmp_path / ".out.lock").is_file()
        _fails(capsys, _argv(data_file, out), f"another training run is writing {out}")
    assert not out.exists() and not (tmp_path / ".out.lock").exists()  # removed on leaving
    (tmp_path / ".out.lock").touch()  # left by a run killed outright: its lock went with it
    assert T.main(_argv(data_file, out, "--eval-batches", "1")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
