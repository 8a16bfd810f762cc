"""The main job on one model: convert, export, validate, generate, and the native CPU kernels and
TensorRT where this machine has them. The CLI's ``run`` prints the result.

    result = run_pipeline("tiny", "xlstm-export-run", max_new_tokens=16)
    for stage, line in result.stages:
        print(stage, line)
    assert result.ok   # every comparison passed

Each stage adds one line to :class:`RunResult`; a comparison that fails marks the result not ok
and the pipeline goes on, so the summary shows every stage. Bad input (a source that is not a
preset or model directory, an output that is a file) raises before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# the prompt of `run` (its UTF-8 bytes as token ids, modulo the vocabulary) and `generate`'s default
DEFAULT_PROMPT = "The xLSTM "


@dataclass
class RunResult:
    """What :func:`run_pipeline` did: one (stage, summary line) per stage in order, and whether every
    comparison passed."""

    stages: list[tuple[str, str]] = field(default_factory=list)
    ok: bool = True

    def add(self, stage: str, line: str, ok: bool = True) -> None:
        self.stages.append((stage, line))
        self.ok &= bool(ok)


def run_pipeline(source: str, output, *, max_new_tokens: int = 16, progress: bool = True) -> RunResult:
    """Run every stage on ``source`` (a preset name, one of our directories or a transformers xLSTM
    directory), writing into the folder ``output``: model/ (convert), model.onnx (+ tokenizer
    files), and model.plan when TensorRT is installed."""
    import numpy as np

    from .export import export_onnx
    from .generate import generate, torch_runner
    from .models import load
    from .ort import OrtModel
    from .plugins.cpu_build import CompilerNotFoundError, find_compiler
    from .tensorrt import TrtModel, build_engine, tensorrt_available
    from .validate import compare_runners, validate_onnx

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    result = RunResult()

    model = load(source)
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    blocks = "".join(t[0] for t in model.config.block_types())
    result.add("convert", f"{model_dir} ({model.num_params():,} parameters, {blocks}, "
                          f"state {model.state_bytes(1):,} bytes/sequence)")

    onnx_path = export_onnx(model, out / "model.onnx", dtype="fp32", progress=progress)
    result.add("export", f"{onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB)")

    report = _validate_with_bar(onnx_path, model, progress)
    worst = report.worst()
    result.add("validate", f"{'PASS' if report.ok else 'FAIL'}: {len(report.rows)} comparisons against "
                           f"PyTorch in float64, worst err {worst.err:.1e} ({worst.name}, limit {worst.limit:.1e})",
               report.ok)

    prompt = np.array([list(DEFAULT_PROMPT.encode())], np.int64) % model.config.vocab_size  # (1, P)
    n = max_new_tokens
    ref = generate(torch_runner(model), prompt, n)
    ort_model = OrtModel(onnx_path)
    got = generate(ort_model.decoder(), prompt, n)
    same = bool(np.array_equal(ref.tokens, got.tokens))
    result.add("generate", f"{n} greedy tokens: onnxruntime {'==' if same else '!='} PyTorch; "
                           f"decode {got.ms_per_token:.2f} ms/token (ORT), {ref.ms_per_token:.2f} (PyTorch)", same)

    try:
        find_compiler()
    except CompilerNotFoundError:
        result.add("native kernels", "skipped: no C++ compiler to build the native CPU kernels "
                                     "(install g++ or set CXX)")
    else:
        native_report = validate_onnx(onnx_path, model, native_ops=True)
        native_gen = generate(OrtModel(onnx_path, native_ops=True).decoder(), prompt, n)
        native_same = bool(np.array_equal(ref.tokens, native_gen.tokens))
        result.add("native kernels", f"{'PASS' if native_report.ok else 'FAIL'}: onnxruntime with the native "
                                     f"CPU kernels vs PyTorch, worst rel err {native_report.worst().err:.1e}; "
                                     f"greedy tokens {'==' if native_same else '!='} PyTorch; decode "
                                     f"{native_gen.ms_per_token:.2f} ms/token", native_report.ok and native_same)

    if tensorrt_available():
        plan = build_engine(onnx_path, out / "model.plan", runtime="tensorrt")
        trt_report = compare_runners(TrtModel(plan), ort_model.run, vocab_size=ort_model.vocab_size,
                                     dtype=ort_model.dtype)
        trt_gen = generate(TrtModel(plan), prompt, n)
        result.add("tensorrt", f"{plan}: {'PASS' if trt_report.ok else 'FAIL'} vs onnxruntime, "
                               f"decode {trt_gen.ms_per_token:.2f} ms/token", trt_report.ok)
    else:
        result.add("tensorrt", "skipped: TensorRT is not installed here (pip install tensorrt on a GPU machine)")
    return result


def progress_bar(total: int, desc: str, quiet: bool):
    """A tqdm bar on a terminal, none when ``quiet`` (the CLI's bars)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=quiet or None, leave=False)


def _validate_with_bar(onnx_path: Path, model, progress: bool):
    """validate_onnx over its default cases with a progress bar (on a terminal unless ``progress`` is False)."""
    from .validate import DEFAULT_CASES, validate_onnx

    bar = progress_bar(len(DEFAULT_CASES), "validate", not progress)
    try:
        return validate_onnx(onnx_path, model, progress=lambda _: bar.update(1))
    finally:
        bar.close()


__all__ = ["DEFAULT_PROMPT", "RunResult", "progress_bar", "run_pipeline"]
