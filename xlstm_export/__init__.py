"""xlstm-export: deploy xLSTM models (convert, export to ONNX, validate, TensorRT, generate, train).

The public API, importable from the package itself::

    from xlstm_export import load, export_onnx, OrtModel, load_tokenizer, generate_text

    model = load("path/to/transformers-xlstm-dir")        # or a preset name: random weights
    onnx_path = export_onnx(model, "model.onnx")          # tokenizer files land beside it
    runner = OrtModel(onnx_path).decoder()
    results, _ = generate_text(runner, load_tokenizer(onnx_path), ["def main"], max_new_tokens=32)
    print(results[0].text)

Names resolve lazily (PEP 562): ``import xlstm_export`` stays cheap, and torch, onnx or
onnxruntime load only with the first name that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that owns it
_API: dict[str, str] = {
    # models: configs, presets, loading and saving, official checkpoints
    "PRESETS": ".models", "CheckpointError": ".models", "xLSTMConfig": ".models", "xLSTMLM": ".models",
    "from_official": ".models", "from_pretrained": ".models", "load": ".models", "preset": ".models",
    "save_pretrained": ".models",
    # ONNX export, onnxruntime, validation
    "ExportError": ".export", "export_onnx": ".export",
    "OrtModel": ".ort",
    "compare_runners": ".validate", "validate_onnx": ".validate",
    # TensorRT / TensorRT-RTX engines (each needs its package at call time; running needs a GPU)
    "TrtModel": ".tensorrt", "build_engine": ".tensorrt", "tensorrt_available": ".tensorrt",
    "read_build_info": ".engine",
    # generation and tokenizers (the module ``xlstm_export.generate`` keeps the name ``generate``)
    "generate_batch": ".generate", "generate_text": ".generate", "torch_runner": ".generate",
    "Tokenizer": ".tokenizer", "TokenizerError": ".tokenizer", "byte_tokenizer": ".tokenizer",
    "TextStream": ".tokenizer", "load_tokenizer": ".tokenizer",
}

__all__ = sorted([*_API, "__version__"])


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("xlstm-export")
        except PackageNotFoundError:
            return "unknown"
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'xlstm_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
