"""Peak memory and time of `xlstm-export export`: the 160M and 1.3B presets (built in memory, random
weights) and a 7B-shaped bfloat16 checkpoint in the transformers layout (streamed, export_stream.py).

    python bench/export.py                          # all three; the 7B checkpoint is written to /tmp
    python bench/export.py --cases 7b --keep        # one case, keep the written checkpoint / .onnx
    python bench/export.py --cases 7b --7b-blocks 8 # the 7B's shapes with 8 of its 32 blocks (less disk)

Each export runs in a child process under ``/usr/bin/time -v`` (peak RSS = "Maximum resident set
size", wall time = "Elapsed"); the written file is then checked with ``onnx.checker`` by path (the
way files over 2 GB must be checked) in another child. The 7B checkpoint holds random bfloat16
weights in sharded safetensors with an index, named as transformers ``xLSTMForCausalLM`` saves
them (weight_mode "single"); it is written one shard at a time and deleted afterwards unless --keep.
Disk: the 7B case needs the checkpoint (12.8 GiB in bfloat16) and the .onnx's external data twice
over for a moment (the export rewrites its data file with the fused weights): ~39 GiB free;
``--7b-blocks N`` keeps the 7B's widths and vocabulary with N blocks (8: ~12 GiB).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

TIME = "/usr/bin/time"
SHARD_BYTES = 2 * 1024**3  # transformers' default max_shard_size is 5 GB; smaller shards bound the writer's memory


def transformers_name(ours: str) -> str:
    """Our state-dict name -> the transformers xLSTMForCausalLM name (weight_mode "single"); the
    inverse of models.convert.state_dict_from_transformers, checked by reading the result back."""
    if ours == "embedding.weight":
        return "backbone.embeddings.weight"
    if ours == "out_norm.weight":
        return "backbone.out_norm.weight"
    if ours == "lm_head.weight":
        return ours
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", ours)
    if m is None:
        raise ValueError(f"no transformers name for {ours!r}")
    i, rest = m.groups()
    if rest.startswith(("norm_mlstm.", "norm_ffn.", "ffn.")):
        return f"backbone.blocks.{i}.{rest}"
    return f"backbone.blocks.{i}.mlstm_layer.{rest}"


def write_7b_checkpoint(directory: Path, seed: int = 0, num_blocks: int = 32) -> int:
    """Random bfloat16 xLSTM-7B weights (``num_blocks`` of its blocks) in the transformers layout;
    returns the weight bytes."""
    from safetensors.torch import save_file

    from xlstm_export.export_stream import meta_model
    from xlstm_export.models import preset
    from xlstm_export.models.lazy import lazy_state_dict

    config = preset("xlstm-7b", num_blocks=num_blocks)
    shapes = {k: tuple(v.shape) for k, v in meta_model(config).state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "xlstm", "architectures": ["xLSTMForCausalLM"], "torch_dtype": "bfloat16",
        "vocab_size": config.vocab_size, "hidden_size": config.embedding_dim, "embedding_dim": config.embedding_dim,
        "num_hidden_layers": config.num_blocks, "num_blocks": config.num_blocks, "num_heads": config.num_heads,
        "use_bias": False, "norm_eps": 1e-6, "qk_dim_factor": 0.5, "v_dim_factor": 1.0, "eps": 1e-6,
        "ffn_proj_factor": 2.667, "ffn_round_up_to_multiple_of": 64, "gate_soft_cap": 15.0,
        "output_logit_soft_cap": 30.0, "weight_mode": "single",
    }, indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for k, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    weight_map, total = {}, 0
    for j, keys in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k in keys:
            t = torch.randn(shapes[k], generator=gen, dtype=torch.float32)
            scale = 1.0 if k.endswith(("norm_mlstm.weight", "norm_ffn.weight", "out_norm.weight", "multihead_norm.weight")) \
                else shapes[k][-1] ** -0.5
            tensors[transformers_name(k)] = (t * scale).to(torch.bfloat16)
            total += tensors[transformers_name(k)].numel() * 2
            weight_map[transformers_name(k)] = name
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    lazy_state_dict(directory)  # the converter reads it back: every name and shape checked
    return total


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; peak RSS (bytes) and wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([TIME, "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"peak_rss_bytes": int(rss.group(1)) * 1024, "wall_s": wall, "stdout": proc.stdout.strip()}


def check(path: Path) -> float:
    """onnx.checker by path (external data stays on disk), in a child; returns its seconds."""
    t0 = time.perf_counter()
    code = f"import onnx; onnx.checker.check_model({str(path)!r}, full_check=True)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"onnx.checker failed on {path}:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def weight_bytes(source: str, dtype_bytes: int) -> int:
    """Bytes of the weights as stored: a directory's tensors (headers), a preset's parameters."""
    if Path(source).is_dir():
        from xlstm_export.models.lazy import lazy_state_dict

        return sum(loc.nbytes for loc in lazy_state_dict(source)[1].values())
    from xlstm_export.cli import config_info

    return config_info(source)["parameters"] * dtype_bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["160m", "1.3b", "7b"],
                    choices=["160m", "1.3b", "7b", "160m-dir", "1.3b-dir"],
                    help="*-dir: the preset saved as a float32 directory first, then exported streamed")
    ap.add_argument("--workdir", default="/tmp/xlstm-bench-export", help="checkpoint and .onnx files go here")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint and .onnx files")
    ap.add_argument("--reuse", action="store_true", help="export the 7B checkpoint already in --workdir "
                    "(written by an earlier --keep run) instead of writing it again")
    ap.add_argument("--7b-blocks", dest="blocks_7b", type=int, default=32,
                    help="blocks of the 7B-shaped checkpoint (32: xLSTM-7B; fewer need less disk)")
    args = ap.parse_args()
    if args.blocks_7b < 1:
        ap.error(f"--7b-blocks must be >= 1, got {args.blocks_7b}")
    if not Path(TIME).exists():
        print(f"{TIME} is needed (GNU time: apt-get install time)", file=sys.stderr)
        return 2
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cases = {  # name -> (source, dtype, bytes per weight in the source, how it is exported)
        "160m": ("xlstm-large-160m", "fp32", 4, "preset, in memory"),
        "1.3b": ("xlstm-1.3b", "fp32", 4, "preset, in memory"),
        "7b": (str(work / f"xlstm-7b-bf16-{args.blocks_7b}"), "bf16", 2,
               f"bf16 transformers checkpoint, {args.blocks_7b} blocks, streamed"),
        "160m-dir": (str(work / "xlstm-large-160m"), "fp32", 4, "fp32 directory (same preset), streamed"),
        "1.3b-dir": (str(work / "xlstm-1.3b"), "fp32", 4, "fp32 directory (same preset), streamed"),
    }
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    rows = []
    try:
        for name in args.cases:
            source, dtype, src_bytes, how = cases[name]
            if name == "7b" and not (args.reuse and (Path(source) / "config.json").is_file()):
                t0 = time.perf_counter()
                total = write_7b_checkpoint(Path(source), num_blocks=args.blocks_7b)
                print(f"wrote {source}: {total / 1e9:.2f} GB of bfloat16 weights in {time.perf_counter() - t0:.0f} s")
            if name.endswith("-dir"):  # written by a child: the parent stays small
                code = (f"from xlstm_export.models import load; "
                        f"load({Path(source).name!r}).save_pretrained({source!r})")
                subprocess.run([sys.executable, "-c", code], check=True)
            out = work / f"{name}.onnx"
            cmd = [sys.executable, "-m", "xlstm_export.cli", "export", source, "-o", str(out),
                   "--dtype", dtype, "--quiet"]
            r = measure(cmd)
            print(f"{name}: {' '.join(cmd)}: peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, wall {r['wall_s']:.0f} s",
                  flush=True)
            check_s = check(out)
            wbytes = weight_bytes(source, src_bytes)
            files = [out, *out.parent.glob(out.name + ".data")]
            rows.append((name, how, dtype, wbytes, r["peak_rss_bytes"], r["wall_s"], check_s,
                         sum(f.stat().st_size for f in files)))
            print(f"{name:5s} {how:40s} {dtype}  weights {wbytes / 2**30:6.2f} GiB  peak RSS "
                  f"{r['peak_rss_bytes'] / 2**30:6.2f} GiB ({r['peak_rss_bytes'] / wbytes:.2f}x)  "
                  f"wall {r['wall_s']:6.1f} s  file {rows[-1][-1] / 2**30:6.2f} GiB  onnx.checker ok ({check_s:.0f} s)",
                  flush=True)
            if not args.keep:
                for f in files:
                    f.unlink(missing_ok=True)
                if name.endswith("-dir"):
                    shutil.rmtree(source, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(cases["7b"][0], ignore_errors=True)
    print("\n| model | source | dtype | weights (source dtype) | peak RSS | RSS / weights | wall | onnx.checker |")
    print("|---|---|---|---|---|---|---|---|")
    for name, how, dtype, wbytes, rss, wall, check_s, _ in rows:
        print(f"| {name} | {how} | {dtype} | {wbytes / 2**30:.2f} GiB | {rss / 2**30:.2f} GiB | "
              f"{rss / wbytes:.2f}x | {wall:.0f} s | pass ({check_s:.0f} s) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
