"""OpenVINO runner for models written by :func:`xlstm_export.export.export_onnx`.

    m = OpenVinoModel("model.onnx")                   # CPU; float32 models computed in float32
    state = m.init_state(batch=2)                     # {"0.c": zeros (2, NH, DQK, DV), ...} float32
    logits, state = m.run(input_ids, state)           # prefill: input_ids (2, S) int64
    logits, state = m.run(next_ids, state)            # decode: (2, 1)

The same numpy surface as :class:`xlstm_export.ort.OrtModel` (``run``, ``init_state``,
``vocab_size``, ``dtype``, ``config``, ``state_names``, ``state_shapes``), so it plugs into
:func:`xlstm_export.generate.generate` and :func:`xlstm_export.validate.compare_runners` unchanged.
The recurrent state is carried as graph inputs / outputs (``past.*`` -> ``present.*``), as with
onnxruntime: OpenVINO's stateful-model transformation is not used.

Which file it runs: OpenVINO's ONNX frontend has no conversion rule for the ``xlstm::mLSTM`` /
``xlstm::sLSTM`` nodes and does not inline ONNX local functions itself. The ``--inline`` export
(standard ops only) is read as it is. Given a default export, the runner inlines its function
bodies in memory first (:func:`xlstm_export.export.inline_xlstm`, the step ``export --inline`` ends
with; milliseconds on the presets; the file is not changed), so both files work; anything still
outside the standard ONNX domain after that raises :class:`~xlstm_export.ort.NotAnXLSTMModelError` naming the ops.

Precision: OpenVINO's CPU plugin picks its inference precision itself, and on CPUs with bfloat16
support (AVX512-BF16 / AMX) its default is bf16 even for a float32 model. The runner therefore sets
``INFERENCE_PRECISION_HINT`` from the graph's dtype: f32 for float32 graphs; f16 for float16 graphs
where the CPU reports FP16 in ``OPTIMIZATION_CAPABILITIES`` (else f32: the plugin then widens the
fp16 weights and computes in f32, as its documentation says); f32 for bfloat16 graphs, i.e. float32
arithmetic over the bf16 weights (ops the graph itself declares bf16 still run in bf16). OpenVINO's
all-bf16 arithmetic is too coarse for these cells: ``validate_onnx(..., runtime="openvino")`` on a
bf16 export of the 7B-style test preset puts it at 8.6x its limit (logits 0.67 off float64 after a
decode step), the f32 hint at 1.3x (worst 0.c, 4.0e-2; onnxruntime passes); measured with
OpenVINO 2026.4. Logits come back as float32 numpy (fp16 / bf16 are widened exactly), states as
float32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .interface import state_output_name
from .graph_rewrite import STANDARD_DOMAINS, all_nodes
from .ort import ExportedModel, NotAnXLSTMModelError, bf16_bits_to_float32

__all__ = ["OpenVinoModel", "openvino_available"]

# graph dtype -> (OpenVINO inference precision hint, the OPTIMIZATION_CAPABILITIES entry it needs)
_PRECISION = {"float32": ("f32", "FP32"), "float16": ("f16", "FP16"), "bfloat16": ("f32", "FP32")}
_PROTOBUF_LIMIT = 1_900_000_000  # bytes: larger models go to OpenVINO through a temporary file


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise ImportError("the OpenVINO runner needs the openvino package: "
                          "pip install 'xlstm-export[openvino]'") from None
    return openvino


class OpenVinoModel(ExportedModel):
    """An exported xLSTM LM compiled by OpenVINO (see the module docstring).

    device: an OpenVINO device name ("CPU", the one this project tests). inference_precision:
    "f32" / "f16" / "bf16" to override the hint chosen from the graph's dtype. num_threads: the
    CPU plugin's INFERENCE_NUM_THREADS (None: OpenVINO's default).
    """

    def __init__(self, path: str | os.PathLike, *, device: str = "CPU",
                 inference_precision: str | None = None, num_threads: int | None = None):
        ov = _import_openvino()

        self._read_interface(path)
        self.device = device

        core = ov.Core()
        if inference_precision is None:
            hint, capability = _PRECISION.get(self.dtype, ("f32", "FP32"))
            if device == "CPU" and capability not in core.get_property(device, "OPTIMIZATION_CAPABILITIES"):
                hint = "f32"  # no native fp16 arithmetic: computed in f32 over the same weights
            inference_precision = hint
        self.inference_precision = inference_precision
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": inference_precision}
        if num_threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        try:
            ov_model = self._read(core)
            self.compiled = core.compile_model(ov_model, device, config)
        except NotAnXLSTMModelError:
            raise
        except Exception as e:  # OpenVINO raises RuntimeError with a multi-line report: one line here
            raise NotAnXLSTMModelError(f"{self.path}: OpenVINO cannot load it on {device}: "
                                       f"{' '.join(str(e).split())}") from e
        self._request = self.compiled.create_infer_request()
        self._outputs = [self.compiled.output("logits"),
                         *(self.compiled.output(state_output_name(k)) for k in self.state_names)]
        # OpenVINO's Python API hands a bf16 tensor out as a float16 array over the raw bf16 bits
        self._bf16_logits = self._outputs[0].get_element_type() == ov.Type.bf16

    def _read(self, core):
        """The OpenVINO model of the file: an --inline export as it is; a default export with its
        xlstm nodes replaced by their function bodies in memory (:func:`export.inline_xlstm`)."""
        if self.metadata.get("bodies") == "inline":
            return core.read_model(str(self.path))  # OpenVINO reads external data itself
        import onnx

        from .export import ExportError, inline_xlstm

        try:
            model = inline_xlstm(onnx.load(str(self.path)))  # loads external data too
        except ExportError as e:
            raise NotAnXLSTMModelError(f"{self.path}: cannot inline its xlstm nodes: {e}") from None
        custom = sorted({f"{n.domain}::{n.op_type}" for n in all_nodes(model.graph)
                         if n.domain not in STANDARD_DOMAINS})
        if custom:
            raise NotAnXLSTMModelError(f"{self.path}: ops outside the standard ONNX domain, OpenVINO "
                                       f"cannot convert them: {custom}")
        if model.ByteSize() < _PROTOBUF_LIMIT:
            return core.read_model(model.SerializeToString())
        import tempfile

        with tempfile.TemporaryDirectory() as d:  # over protobuf's 2 GB: go through a file
            p = Path(d) / "inlined.onnx"
            onnx.save_model(model, p, save_as_external_data=True, location="inlined.onnx.data")
            return core.read_model(str(p))

    def run(self, input_ids, state: Mapping[str, Any] | None = None
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """input_ids (B, S) int -> logits (B, S, vocab) float32, new state {name: float32 array}.

        ``state`` None starts fresh sequences; torch tensors are accepted anywhere numpy is. The
        returned arrays are the caller's own (copied out of OpenVINO's output tensors).
        """
        feeds = self._feeds(input_ids, state)
        res = self._request.infer(feeds)  # share_outputs=False: results are copies
        logits = np.asarray(res[self._outputs[0]])  # (B, S, vocab)
        if self._bf16_logits:  # the raw bf16 bits, widened exactly (bf16 is the top half of fp32)
            logits = bf16_bits_to_float32(logits)
        logits = logits.astype(np.float32, copy=False)
        new_state = {k: np.asarray(res[o], dtype=np.float32)
                     for k, o in zip(self.state_names, self._outputs[1:])}
        return logits, new_state

    __call__ = run

