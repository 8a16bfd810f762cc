"""The `xlstm-export` command line.

Every subcommand is a thin layer over a library function. Errors a user can cause (a bad path, a
bad checkpoint, a shape mismatch) end in one line on stderr and exit code 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .pipeline import DEFAULT_PROMPT, progress_bar


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""


def _load_model(source: str, **overrides):
    from .models import load

    return load(source, **overrides)


# --- convert / info ------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from .models.io import check_replaceable

    out = Path(args.output)
    check_replaceable(out)  # before the model loads: a folder of other work is refused, not replaced
    model = _load_model(args.source, dtype=args.dtype)  # None: the checkpoint's dtype
    model.save_pretrained(out)
    dtype = str(model.dtype).replace("torch.", "")
    tok = sorted(getattr(model, "tokenizer_files", None) or ())
    tok = f" and {', '.join(tok)}" if tok else ", no tokenizer.json"
    print(f"wrote {out}/config.json and {out}/model.safetensors ({model.num_params():,} parameters, {dtype}){tok}")
    return 0


def model_info(model) -> dict:
    cfg = model.config
    return {
        "architecture": cfg.architecture,
        "config": cfg.to_dict(),
        "block_types": cfg.block_types(),
        "parameters": model.num_params(),
        "state_bytes_per_sequence": model.state_bytes(1),
        "state_tensors": {k: list(s) for k, s in model.state_spec(1).items()},
    }


def config_info(source: str) -> dict:
    """``model_info`` from the config alone (a preset or config.json; no weights read or built):
    the counts come from the model built on the meta device. Adds the checkpoint's stored dtype."""
    from .export_stream import meta_model
    from .models import PRESETS, CheckpointError, preset
    from .models.lazy import lazy_state_dict
    from .models.model import checkpoint_dtype

    if source in PRESETS:
        config, stored = preset(source), "float32"
    elif Path(source).is_dir():
        config, locations = lazy_state_dict(source)  # config.json and the safetensors headers only
        try:
            stored = str(checkpoint_dtype(locations, source)).replace("torch.", "")
        except CheckpointError:  # float8 (integers are refused above): convert / export take --dtype
            stored = ", ".join(sorted({str(loc.dtype).replace("torch.", "") for loc in locations.values()}))
    elif Path(source).exists():
        raise CheckpointError(f"{source}: expected a model directory (config.json + safetensors), got a file")
    else:
        raise CheckpointError(f"{source}: no such preset or directory; presets: {', '.join(PRESETS)}")
    # checkpoint_dtype: a dtype name (or several), machine-readable; random_weights: a preset
    return {**model_info(meta_model(config)), "checkpoint_dtype": stored, "random_weights": source in PRESETS}


def cmd_info(args) -> int:
    info = config_info(args.source)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    print(f"architecture      {info['architecture']}")
    print(f"blocks            {cfg['num_blocks']}  ({''.join(t[0] for t in info['block_types'])}: m = mLSTM, s = sLSTM)")
    print(f"embedding_dim     {cfg['embedding_dim']}")
    print(f"vocab_size        {cfg['vocab_size']}")
    print(f"mLSTM heads       {cfg['num_heads']}")
    if cfg["slstm_at"]:
        print(f"sLSTM heads       {cfg['slstm_num_heads']}  at blocks {cfg['slstm_at']}")
    from .models.model import DTYPES  # the dtypes a model computes in (names: float32, ...)

    stored = info["checkpoint_dtype"]
    note = " (random weights)" if info["random_weights"] else "" if stored in DTYPES else \
        ": convert or export it with --dtype"
    print(f"parameters        {info['parameters']:,}  (stored as {stored}{note})")
    print(f"state per seq     {info['state_bytes_per_sequence']:,} bytes (float32, {len(info['state_tensors'])} tensors)")
    return 0


# --- export / validate / generate / build ---------------------------------------------------------
def cmd_export(args) -> int:
    """A model directory streams its weights into the file (export_stream.py: the model is never
    materialised); a preset is built (random weights) and exported as it is."""
    from .export import export_onnx
    from .models import PRESETS

    if args.source not in PRESETS and Path(args.source).is_dir():
        from .export_stream import default_export_dtype, export_checkpoint, meta_model
        from .models.lazy import lazy_state_dict
        from .models.model import checkpoint_dtype

        config, locations = lazy_state_dict(args.source)  # config.json and the headers only
        dtype = args.dtype or default_export_dtype(checkpoint_dtype(locations, args.source))
        path = export_checkpoint(args.source, args.output, dtype=dtype, progress=not args.quiet,
                                 inline=args.inline, external_data=args.external_data)
        n_states = len(meta_model(config).state_spec(1))
    else:
        model = _load_model(args.source)
        dtype = args.dtype or "fp32"
        path = export_onnx(model, args.output, dtype=dtype, progress=not args.quiet, inline=args.inline,
                           external_data=args.external_data)
        n_states = len(model.state_spec(1))
    kind = ", standard ops only" if args.inline else ""
    print(f"wrote {path} ({dtype}, {n_states} state tensors{kind})")
    return 0


def cmd_validate(args) -> int:
    from .validate import DEFAULT_CASES, compare_runners, validate_onnx

    _require_file(args.model, ".onnx")
    if args.source:  # a file that is not an export: said before the source loads (minutes for 7B)
        from .ort import inspect_model

        inspect_model(args.model)
    if args.engine and args.native_ops:
        raise UserError("--native-ops compares onnxruntime with PyTorch (--source), not with --engine")
    if args.runtime == "openvino" and (args.engine or args.native_ops):
        raise UserError("--runtime openvino compares OpenVINO with PyTorch (--source); "
                        "--engine and --native-ops do not apply to it")
    if args.runtime == "openvino":
        _require_openvino()
    bar = progress_bar(len(DEFAULT_CASES), "validate", args.quiet)
    step = lambda _: bar.update(1)  # noqa: E731
    limits = {"factor": args.factor, "atol": args.atol, "median": args.median}
    if args.engine:
        from .ort import OrtModel
        from .tensorrt import TrtModel

        _require_engine(args.engine)
        _check_engine_source(args.engine, args.model)
        ort_model = OrtModel(args.model)
        if args.source:  # TensorRT against PyTorch in float64, limits from PyTorch in the dtype
            from .validate import check_exported_from, compare_with_torch

            model = _load_model(args.source)
            check_exported_from(args.model, model)
            report = compare_with_torch(TrtModel(args.engine), model, ort_model.dtype,
                                        vocab_size=ort_model.vocab_size, progress=step, **limits)
        else:
            if any(v is not None for v in limits.values()):
                raise UserError("--factor / --atol / --median need --source (limits come from PyTorch in "
                                "the export's dtype)")
            report = compare_runners(
                TrtModel(args.engine), ort_model.run, vocab_size=ort_model.vocab_size,
                dtype=ort_model.dtype, progress=step,
            )
    else:
        if not args.source:
            raise UserError("validate needs --source SRC (the PyTorch model) or --engine PLAN")
        report = validate_onnx(args.model, _load_model(args.source), native_ops=args.native_ops,
                               runtime=args.runtime, progress=step, **limits)
    bar.close()
    print(report.table(all_rows=args.all))
    return 0 if report.ok else 1


def _runner(target: str, native_ops: bool = False, runtime: str = "onnxruntime"):
    """(runner, vocab_size, label) for a preset/model directory, an .onnx file or a TensorRT plan."""
    from .generate import torch_runner

    from .interface import model_file_kind

    kind = model_file_kind(target)
    if native_ops and kind != "onnx":
        raise UserError("--native-ops applies to an .onnx target (onnxruntime's CPU provider)")
    if runtime == "openvino":
        if kind != "onnx" or native_ops:
            raise UserError("--runtime openvino runs an .onnx file (standard ops), without --native-ops")
        from .openvino_runner import OpenVinoModel

        _require_file(target, ".onnx")
        _require_openvino()
        m = OpenVinoModel(target)
        return m.run, m.vocab_size, f"OpenVINO ({m.device}, {m.inference_precision})"
    if kind == "onnx":
        from .ort import OrtModel

        _require_file(target, ".onnx")
        m = OrtModel(target, native_ops=native_ops)
        return m.decoder(), m.vocab_size, "onnxruntime" + (" (native kernels)" if native_ops else "")
    if kind == "engine":
        from .tensorrt import TrtModel

        _require_engine(target)
        m = TrtModel(target)
        return m, m.vocab_size, _engine_label(m.build_info, m.runtime)
    if Path(target).is_file():
        raise UserError(f"{target}: expected a preset, a model directory, an .onnx file or a TensorRT "
                        ".engine/.plan, got a file of another kind")
    model = _load_model(target)
    return torch_runner(model), model.config.vocab_size, "PyTorch"


def cmd_generate(args) -> int:
    _check_generate_args(args)
    runner, vocab, label = _runner(args.target, args.native_ops, args.runtime)
    from .models import PRESETS
    from .tokenizer import tokenizer_for

    tok = tokenizer_for(None if args.target in PRESETS else args.target, vocab)
    if args.prompt_ids is not None:
        return _generate_ids(args, runner, vocab, label, tok)
    if tok is None:
        what = f"--prompt {args.prompt!r}" if args.prompt is not None else (
            f"--prompts {args.prompts}" if args.prompts else f"the default prompt {DEFAULT_PROMPT!r}")
        raise UserError(f"{what} needs a tokenizer, and {args.target} has none (no tokenizer.json beside it, "
                        f"vocab_size {vocab}): give token ids with --prompt-ids")
    return _generate_text(args, runner, vocab, label, tok)


def _check_generate_args(args) -> None:
    """One clear error per bad generate option, before any model is loaded."""
    import math

    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be >= 1 (leave it out to sample from the whole vocabulary), got {args.top_k}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must lie in [0, 2**63), got {args.seed}")
    if args.prompt_ids is not None and not args.prompt_ids.replace(",", " ").strip():
        raise UserError("--prompt-ids is empty: give at least one token id, e.g. --prompt-ids 1,2,3")
    if args.prompt is not None and not args.prompt:
        raise UserError("--prompt is empty: give some text")
    if any(not s for s in args.stop or ()):
        raise UserError("--stop is empty: give the text that ends a completion")
    if args.prompts is not None:
        _require_file(args.prompts, None)
    if args.temperature == 0 and (args.top_k is not None or args.seed is not None):
        given = [o for o, v in (("--top-k", args.top_k), ("--seed", args.seed)) if v is not None]
        verb = "apply" if len(given) > 1 else "applies"
        print(f"note: {' and '.join(given)} {verb} to sampling (--temperature > 0); generating greedily",
              file=sys.stderr)


def _read_prompts(path: str) -> list[str]:
    """One prompt per line of a UTF-8 file; empty lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line for line in text.splitlines() if line]
    if not prompts:
        raise UserError(f"{path}: no prompts (one prompt per line)")
    return prompts


def _check_ids(ids: list[int], vocab: int | None, what: str) -> None:
    if not ids:
        raise UserError(f"{what} encodes to no tokens")
    if vocab is not None and (min(ids) < 0 or max(ids) >= vocab):
        raise UserError(f"{what}: token ids must lie in [0, {vocab}), got values in [{min(ids)}, {max(ids)}]")


def _generate_ids(args, runner, vocab, label, tok) -> int:
    """--prompt-ids: token ids in, token ids out (and their text when the model has a tokenizer)."""
    from .generate import generate_batch

    try:  # "1,2,3", "1, 2, 3" or "1 2 3"; an empty field ("1,,2") is a mistake, not nothing
        ids = [int(t) for t in re.split(r"\s*,\s*|\s+", args.prompt_ids.strip())]
    except ValueError:
        raise UserError(f"--prompt-ids must be integers separated by commas or spaces, got {args.prompt_ids!r}")
    _check_ids(ids, vocab, "the prompt")
    if args.stop and tok is None:
        raise UserError("--stop needs a tokenizer to see text, and this model has none")
    stream = _text_stream(tok, args.stop)
    bar = progress_bar(args.max_new_tokens, f"generate ({label})", args.quiet)

    def on_token(_row: int, t: int) -> bool:
        bar.update(1)
        if stream is None:
            return False
        stream.push([t])
        return stream.stopped

    res = generate_batch(runner, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         seed=args.seed or 0, eos_token_ids=tok.eos_token_ids if tok else (), on_token=on_token)
    bar.close()
    new = res.tokens[0]
    print("tokens:", " ".join(map(str, new)))
    if stream is not None:
        stream.finish()
        print("text:  ", repr(stream.text))
    if not args.quiet:
        print(f"{label}: prefill {len(ids)} tokens in {res.prefill_s * 1e3:.1f} ms, "
              f"decode {res.ms_per_step:.2f} ms/token", file=sys.stderr)
    return 0


def _text_stream(tok, stop):
    from .tokenizer import TextStream

    return None if tok is None else TextStream(tok, stop or ())


def _generate_text(args, runner, vocab, label, tok) -> int:
    """--prompt: the completion streamed to stdout as it comes (statistics on stderr);
    --prompts FILE: every line's completion in one batch, one JSON object per line on stdout."""
    from .generate import generate_text

    prompts = _read_prompts(args.prompts) if args.prompts else [args.prompt if args.prompt is not None
                                                                 else DEFAULT_PROMPT]
    for i, p in enumerate(prompts):
        _check_ids(tok.encode(p), vocab, f"prompt {p!r}" if len(prompts) == 1 else f"{args.prompts}:{i + 1}")
    single = len(prompts) == 1 and not args.prompts

    def on_text(_row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    results, res = generate_text(runner, tok, prompts, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, seed=args.seed or 0, stop=args.stop or (),
                                 on_text=on_text if single else None)
    if single:
        sys.stdout.write("\n")
    else:
        for r in results:
            print(json.dumps({"prompt": r.prompt, "text": r.text, "finish_reason": r.finish_reason,
                              "tokens": len(r.tokens)}, ensure_ascii=False))
    if not args.quiet:
        n_in = sum(len(tok.encode(p)) for p in prompts)
        print(f"{label}: {len(prompts)} prompt(s), {n_in} prompt tokens, prefill {res.prefill_s * 1e3:.1f} ms, "
              f"{sum(len(r.tokens) for r in results)} new tokens, {res.ms_per_step:.2f} ms per batch step",
              file=sys.stderr)
    return 0


def cmd_build(args) -> int:
    import logging

    from .engine import RUNTIMES, build_engine, build_info_path, read_build_info

    _require_file(args.model, ".onnx")
    if args.verbose:  # every builder message
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("xlstm_export.tensorrt")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else None
    engine = build_engine(args.model, args.output, runtime=args.runtime, plugins=False if args.no_plugins else None,
                          precision=precision, batch=tuple(args.batch), seq=tuple(args.seq), verbose=args.verbose)
    info = read_build_info(engine)
    label = RUNTIMES[info["runtime"]].label
    how = ("our AOT plugins" if info["plugins"] else "their function bodies") if info["cells"] else \
        "the standard ops of an --inline export"
    print(f"{label} {info['runtime_version']}, {info['precision']}: the xlstm cells compiled from {how}")
    width = max((len(c["node"]) for c in info["cells"]), default=0)
    for c in info["cells"]:
        loops = f" [{', '.join(c['loops'])}]" if c["loops"] else ""
        print(f"  {c['node']:<{width}}  xlstm::{c['op']:<5}  {c['compiled_as']}{loops}, {c['layers']} network layers")
    if not info["cells"]:
        print(f"  network loops: {', '.join(info['network']['loop_names']) or 'none'}")
    rep = info["engine_report"]
    if rep:
        kinds = ", ".join(f"{k} {v}" for k, v in list(rep["layer_types"].items())[:6])
        print(f"  engine: {rep['layers']} layers after fusion ({kinds}, ...)")
    p = info["profiles"][0]
    print(f"  profile: batch {'/'.join(map(str, p['batch']))}, sequence {'/'.join(map(str, p['sequence']))} "
          f"(min/opt/max); {info['warnings']} builder warnings" + ("" if args.verbose else " (--verbose shows them)"))
    print(f"built in {info['build_seconds']:.1f} s: {engine} ({info['engine']['bytes'] / 2**20:.1f} MiB), "
          f"record {build_info_path(engine)}")
    return 0


# --- serve / triton-repo ---------------------------------------------------------------------------
def cmd_serve(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("serve needs uvicorn and starlette: pip install 'xlstm-export[serve]'") from None
    from .serve import run_server

    from .interface import model_file_kind

    target = args.target
    if model_file_kind(target):
        _require_file(target, None)
    run_server(target, host=args.host, port=args.port, max_batch=args.max_batch, max_state_mb=args.max_state_mb,
               max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, name=args.model_name,
               native_ops=not args.no_native_ops, threads=args.threads, stream_interval=args.stream_interval / 1e3,
               engine_process=not args.in_process, log_level=args.log_level)
    return 0


def cmd_triton_repo(args) -> int:
    from .triton_repo import write_triton_repo

    _require_file(args.model, None)
    model_dir = write_triton_repo(args.model, args.output, name=args.name, max_batch=args.max_batch,
                                  device=args.device, instances=args.instances, overwrite=args.overwrite)
    print(f"wrote {model_dir}/config.pbtxt and {model_dir}/1/; run: tritonserver --model-repository={args.output}")
    return 0


def _engine_label(info: dict | None, runtime: str) -> str:
    from .engine import RUNTIMES

    label = RUNTIMES[runtime].label
    if info:
        label += " (plugins)" if info["plugins"] else " (function bodies)"
    return label


def _check_engine_source(engine: str, onnx_path: str) -> None:
    """An engine with a build record must come from the ONNX file it is compared with."""
    from .engine import file_sha256, read_build_info

    info = read_build_info(engine)
    if info is not None and info["onnx"]["sha256"] != file_sha256(onnx_path):
        raise UserError(f"{engine} was built from another ONNX file ({info['onnx']['file']}, sha256 "
                        f"{info['onnx']['sha256'][:12]}...), not {onnx_path}: rebuild it or give that file")


def _require_openvino() -> None:
    from .openvino_runner import openvino_available

    if not openvino_available():
        raise UserError("--runtime openvino needs the openvino package: pip install 'xlstm-export[openvino]'")


def _require_file(path: str, suffix: str | None) -> None:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file")
    if p.is_dir():
        raise UserError(f"{path}: is a directory, expected a file")
    if suffix and p.suffix.lower() != suffix:
        raise UserError(f"{path}: expected a {suffix} file")


def _require_engine(path: str) -> None:
    """A TensorRT engine file: one of the names `build` writes (.engine / .plan)."""
    from .interface import ENGINE_SUFFIXES, model_file_kind

    _require_file(path, None)
    if model_file_kind(path) != "engine":
        raise UserError(f"{path}: expected a TensorRT engine ({' or '.join(ENGINE_SUFFIXES)}, written by "
                        "`xlstm-export build`)")


# --- run: the main job ----------------------------------------------------------------------------
def cmd_run(args) -> int:
    """The whole pipeline on one model (:func:`xlstm_export.pipeline.run_pipeline`), with one summary
    at the end; exit 1 when a comparison failed."""
    from .pipeline import run_pipeline

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    result = run_pipeline(args.source, args.output, max_new_tokens=args.max_new_tokens, progress=not args.quiet)
    width = max(len(k) for k, _ in result.stages)
    print("\nsummary")
    for k, v in result.stages:
        print(f"  {k:<{width}}  {v}")
    return 0 if result.ok else 1


# --- parser --------------------------------------------------------------------------------------
NATIVE_HELP = ("run the cells with the native onnxruntime CPU kernels (compiled on first use with the "
               "system C++ compiler) instead of their standard-op function bodies")
RUNTIME_HELP = ("what runs an .onnx file: onnxruntime (default) or openvino (OpenVINO on CPU, float32 "
                "models computed in f32; needs the openvino extra)")
SOURCE_HELP = "a preset name (e.g. tiny), a directory written by convert/train, or a transformers xLSTM directory"


def _validate_defaults() -> str:
    from .validate import DEFAULT_ATOL, DEFAULT_FACTOR, DEFAULT_MEDIAN, OUTPUT_MEDIAN_SCALE

    per_dtype = "; ".join(f"{d} factor {DEFAULT_FACTOR[d]:g}, atol {DEFAULT_ATOL[d]:g}, median {DEFAULT_MEDIAN[d]:g}"
                          for d in DEFAULT_FACTOR)
    return f"{per_dtype}; each output's own median ratio may reach {OUTPUT_MEDIAN_SCALE:g} x MEDIAN"


def _float_at_least(low: float, why: str = ""):
    """An argparse type: a float >= ``low`` (nan refused), else "must be >= low{why}"."""

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (x >= low and x != float("inf")):  # also rejects nan; inf would be no limit at all
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low:g}{why}, got {text}")
        return x

    return parse


_ratio = _float_at_least(1.0, " (a ratio to PyTorch's own error)")  # --factor, --median
_nonnegative_float = _float_at_least(0.0)


def build_parser() -> argparse.ArgumentParser:
    from .engine import DEFAULT_SEQ  # one default for `build --seq` and build_engine()

    p = argparse.ArgumentParser(
        prog="xlstm-export",
        description="Deploy xLSTM models: convert, export to ONNX with xlstm:: custom ops, validate, "
        "build TensorRT engines, generate, train.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="write a model in this project's format (config.json + safetensors)")
    c.add_argument("source", help=SOURCE_HELP)
    c.add_argument("-o", "--output", required=True, help="output directory")
    c.add_argument("--dtype", choices=["fp32", "fp64", "fp16", "bf16"], default=None,
                   help="weights dtype of the written model (default: the checkpoint's own; presets: fp32)")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="config, parameter count and state bytes per sequence")
    i.add_argument("source", help=SOURCE_HELP)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("export", help="export to ONNX with xlstm::mLSTM / xlstm::sLSTM custom ops")
    e.add_argument("source", help=SOURCE_HELP)
    e.add_argument("-o", "--output", required=True, help="output .onnx path")
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="weights and logits dtype (states stay float32); default: the checkpoint's dtype "
                        "(fp32 for presets)")
    e.add_argument("--inline", action="store_true",
                   help="standard ops only: the xlstm function bodies inlined (for OpenVINO and runtimes "
                        "that take neither custom domains nor local functions)")
    e.add_argument("--external-data", action="store_true", default=None,
                   help="weights in OUTPUT.data beside the .onnx whatever their size (default: only over 2 GB); "
                        "a directory's export then never holds them all in memory")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("validate", help="the export against PyTorch in float64 (--source), judged by what PyTorch "
                       "achieves in the export's dtype; or TensorRT vs onnxruntime (--engine alone)",
                       description="Every output and state is compared with the PyTorch model in float64; a row "
                       "passes when the export's error is at most FACTOR times the error of PyTorch run in the "
                       "export's dtype (or ATOL, whichever is larger), and the median over the rows of that "
                       "ratio must be at most MEDIAN. Defaults: " + _validate_defaults() +
                       ". Exit 0 = pass, 1 = fail, 2 = bad input.")
    v.add_argument("model", help="the exported .onnx file")
    v.add_argument("--source", help=SOURCE_HELP + " that was exported")
    v.add_argument("--engine", help="a TensorRT plan built from the .onnx file")
    v.add_argument("--factor", type=_ratio, default=None,
                   help="limit = FACTOR x the error of PyTorch in the export's dtype (default per dtype)")
    v.add_argument("--atol", type=_nonnegative_float, default=None,
                   help="floor of the limit, in the error's units max|x - ref| / max|ref| (default per dtype)")
    v.add_argument("--median", type=_ratio, default=None,
                   help="limit of the median over the rows of export error / PyTorch error (default per dtype)")
    v.add_argument("--all", action="store_true", help="one row per state tensor instead of the worst per case")
    v.add_argument("--native-ops", action="store_true", help=NATIVE_HELP)
    v.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime", help=RUNTIME_HELP)
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_validate)

    g = sub.add_parser("generate", help="generate tokens carrying the recurrent state between steps")
    g.add_argument("target", help=SOURCE_HELP + ", an .onnx file or a TensorRT .plan")
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help=f"prompt text, encoded with the model's tokenizer; the completion is "
                        f"streamed to stdout (default: {DEFAULT_PROMPT!r})")
    prompt.add_argument("--prompts", metavar="FILE", help="a text file, one prompt per line, generated as one "
                        "batch; prints one JSON object per prompt")
    prompt.add_argument("--prompt-ids", help="prompt token ids, e.g. 1,2,3; prints the new token ids")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="end a completion before this text (repeatable); EOS ends it too")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default: 32)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (k >= 1)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    g.add_argument("--native-ops", action="store_true", help=NATIVE_HELP)
    g.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime", help=RUNTIME_HELP)
    g.add_argument("--quiet", action="store_true", help="no progress bar, no timing line")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("build", help="build a TensorRT engine (plugins, needs a GPU) or a TensorRT-RTX engine "
                       "(function bodies, no GPU needed), and its build record <engine>.json")
    b.add_argument("model", help="the exported .onnx file")
    b.add_argument("-o", "--output", required=True, help="output engine path (.engine or .plan)")
    b.add_argument("--runtime", choices=["tensorrt", "tensorrt-rtx"], default=None,
                   help="default: tensorrt where it imports and a CUDA GPU is present, else tensorrt-rtx")
    b.add_argument("--no-plugins", action="store_true",
                   help="TensorRT: compile the xlstm nodes from their function bodies, not our plugins "
                        "(TensorRT-RTX always does)")
    b.add_argument("--verbose", action="store_true", help="print every TensorRT message")
    prec = b.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="the model must have been exported with --dtype fp16")
    prec.add_argument("--bf16", action="store_true", help="the model must have been exported with --dtype bf16")
    b.add_argument("--batch", type=int, nargs=3, default=[1, 1, 8], metavar=("MIN", "OPT", "MAX"),
                   help="the profile's batch sizes (default: 1 1 8)")
    b.add_argument("--seq", type=int, nargs=3, default=list(DEFAULT_SEQ), metavar=("MIN", "OPT", "MAX"),
                   help=f"the profile's sequence lengths (default: {' '.join(map(str, DEFAULT_SEQ))})")
    b.set_defaults(func=cmd_build)

    sv = sub.add_parser("serve", help="OpenAI-compatible completions server with continuous batching")
    sv.add_argument("target", help=SOURCE_HELP + ", an .onnx file (onnxruntime) or a TensorRT .engine/.plan")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="default: 8000")
    sv.add_argument("--max-batch", type=int, default=32, help="sequences decoded together at most (default: 32)")
    sv.add_argument("--max-state-mb", type=float, default=2048,
                    help="state memory for all sequence slots, MiB (default: 2048)")
    sv.add_argument("--max-queue", type=int, default=256,
                    help="requests waiting for a slot before 503 (default: 256)")
    sv.add_argument("--prefill-chunk", type=int, default=64,
                    help="prompt tokens per sequence per scheduler step (default: 64)")
    sv.add_argument("--stream-interval", type=_nonnegative_float, default=0.0, metavar="MS",
                    help="streamed tokens of running sequences go out at most every MS milliseconds, several "
                         "per event (first tokens and ends at once): less work per token at high concurrency "
                         "(default: 0, every token as it comes)")
    sv.add_argument("--in-process", action="store_true",
                    help="run the model and its scheduler in a thread of the server process, not in a process "
                         "of their own (which shares no GIL with the HTTP layer: more tokens/s under "
                         "concurrency; a thread has a little less latency per token for a single stream)")
    sv.add_argument("--model-name", default=None, help="the model id clients send (default: the file's stem)")
    sv.add_argument("--no-native-ops", action="store_true", help="onnxruntime without the native CPU kernels")
    sv.add_argument("--threads", type=int, default=None,
                    help="onnxruntime intra-op threads (default: all cores; the HTTP layer shares them)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(func=cmd_serve)

    tr = sub.add_parser("triton-repo", help="a Triton Inference Server model repository (sequence batching, "
                        "implicit state)")
    tr.add_argument("model", help="an exported .onnx file or a TensorRT .engine/.plan with its build record")
    tr.add_argument("-o", "--output", required=True, help="the model repository directory")
    tr.add_argument("--name", default="xlstm", help="model name in the repository (default: xlstm)")
    tr.add_argument("--max-batch", type=int, default=None,
                    help="Triton's max_batch_size (default: 32; an engine's profile maximum)")
    tr.add_argument("--device", choices=["cpu", "gpu"], default=None,
                    help="instance group for an .onnx model (default: cpu; an engine is always gpu)")
    tr.add_argument("--instances", type=int, default=1,
                    help="model instances Triton runs side by side, each with its own sequence slots "
                         "(the instance group's count; default: 1)")
    tr.add_argument("--overwrite", action="store_true", help="replace the model's folder if it exists")
    tr.set_defaults(func=cmd_triton_repo)

    from .train import add_train_arguments, run_train

    t = sub.add_parser("train", help="train a model on a text file (byte-level), resumable, torchrun-ready")
    add_train_arguments(t)
    t.set_defaults(func=run_train)

    r = sub.add_parser("run", help="the main job: convert, export, validate, generate (and TensorRT when present)")
    r.add_argument("source", nargs="?", default="tiny", help=SOURCE_HELP + " (default: tiny)")
    r.add_argument("-o", "--output", default="xlstm-export-run", help="output folder (default: ./xlstm-export-run)")
    r.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default: 16)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)

    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("xlstm-export: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `generate ... | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, as a tool killed by the signal reports
    except Exception as e:  # one clear line for the user; --debug for the traceback
        if args.debug or not _is_user_error(e):
            raise
        print(f"xlstm-export {args.command}: error: {e}", file=sys.stderr)
        return 2


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xlstm-export")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _is_user_error(e: Exception) -> bool:
    from .models import CheckpointError

    return isinstance(e, (UserError, CheckpointError, ValueError, TypeError, OSError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
