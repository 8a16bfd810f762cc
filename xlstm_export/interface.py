"""The names an exported file's interface is made of, shared by the exporter (:mod:`.export`) and
the runners (:mod:`.ort`, :mod:`.openvino_runner`, :mod:`.serve`). No torch here: a runner of an
.onnx file (``xlstm-export serve model.onnx``) never imports it.

    state_input_name("0.c") == "past.0.c";  state_output_name("0.c") == "present.0.c"
    model_file_kind("m.onnx") == "onnx";  model_file_kind("m.PLAN") == "engine"
"""

from __future__ import annotations

import os

__all__ = ["ENGINE_SUFFIXES", "LOGITS_FROM", "METADATA_PREFIX", "model_file_kind", "state_input_name",
           "state_output_name"]

LOGITS_FROM = "logits_from"  # int64 (1,) initializer: logits for positions logits_from: (0 = all)
METADATA_PREFIX = "xlstm_export."  # metadata_props keys: format, dtype, state_names, config
ENGINE_SUFFIXES = (".engine", ".plan")  # what build_engine writes (TensorRT names both)


def state_input_name(key: str) -> str:
    return f"past.{key}"


def state_output_name(key: str) -> str:
    return f"present.{key}"


def model_file_kind(path: str | os.PathLike) -> str | None:
    """What a model file's name says it is: "onnx" (.onnx), "engine" (a TensorRT .engine / .plan) or
    None (a preset or a checkpoint directory). The suffix's case does not matter: a file copied
    from another system as MODEL.ONNX is still an ONNX file. (What this package writes is always
    lower case.)"""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    return None
