"""The names an exported file's interface is made of, shared by the exporter (:mod:`.export`) and
the runners (:mod:`.ort`, :mod:`.openvino_runner`, :mod:`.serve`). No torch here: a runner of an
.onnx file (``xlstm-export serve model.onnx``) never imports it.

    state_input_name("0.c") == "past.0.c";  state_output_name("0.c") == "present.0.c"
"""

from __future__ import annotations

__all__ = ["LOGITS_FROM", "METADATA_PREFIX", "state_input_name", "state_output_name"]

LOGITS_FROM = "logits_from"  # int64 (1,) initializer: logits for positions logits_from: (0 = all)
METADATA_PREFIX = "xlstm_export."  # metadata_props keys: format, dtype, state_names, config


def state_input_name(key: str) -> str:
    return f"past.{key}"


def state_output_name(key: str) -> str:
    return f"present.{key}"
