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
fp16 weights and computes in f32, as its documentation says); f32 for bfloat16 graphs, and the
graph widened first as onnxruntime's CPU provider runs it (:func:`xlstm_export.ort.upcast_bfloat16`:
float32 arithmetic, the graph's own Casts to bfloat16 kept as rounding points; the weights stay
bf16 behind a Cast). The hint alone is not enough: the plugin computes the ops a graph declares
bf16 in bf16 whatever the hint, and that arithmetic put the mLSTM states of the 7B-style test
models 3-5x further from float64 than PyTorch's own bf16 at long prefills (validate's median
typical ratio 1.5-1.8 over its 1.5 limit on honest exports; widened 0.9-1.1, as onnxruntime);
OpenVINO's all-bf16 default is coarser still (logits 0.67 off float64 after a decode step);
measured with OpenVINO 2026.4. ``inference_precision="bf16"`` runs the graph as it is.
Logits come back as float32 numpy (fp16 / bf16 are widened exactly), states as
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
from .ort import ExportedModel, NotAnXLSTMModelError, bf16_bits_to_float32, upcast_bfloat16

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


# The oldest OpenVINO release this runner takes. Measured (bench/runtime_versions.py and
# tests/test_openvino.py with each release installed on its own, bench/RESULTS.md): 2024.0 refuses
# the inlined graphs, 2024.1-2024.2 run the 7B-style ones with wrong results (the mLSTM states
# 9-20% off after a 7-token prefill), 2024.3 fails to compile the float16 ones; 2025.0 on pass.
MIN_OPENVINO = (2025, 0)


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise ImportError("the OpenVINO runner needs the openvino package: "
                          "pip install 'xlstm-export[openvino]'") from None
    version = openvino.__version__.split("-")[0]  # "2026.4.1-22982-e213a147257-releases/2026/4"
    try:
        release = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:  # a development build without a release number: take it as it is
        return openvino
    if release < MIN_OPENVINO:
        raise RuntimeError(f"OpenVINO {version} is too old for these models (2024.1-2024.2 compute the "
                          f"7B-style ones wrong, 2024.3 cannot compile float16 ones): the runner needs "
                          f"OpenVINO >= {'.'.join(map(str, MIN_OPENVINO))}; pip install -U 'xlstm-export[openvino]'")
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
        # bf16 graph, f32 arithmetic: widen it as onnxruntime's CPU provider runs it (see _read)
        self.upcast = self.dtype == "bfloat16" and inference_precision == "f32"
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
        xlstm nodes replaced by their function bodies in memory (:func:`export.inline_xlstm`). A
        bfloat16 graph run with the f32 hint is widened first (:func:`_upcast_keeping_bf16_weights`):
        OpenVINO's CPU plugin computes the ops a graph declares bf16 in bf16 whatever the hint, and
        its bf16 arithmetic put the mLSTM states of the 7B-style test models 3-5x further from
        float64 than PyTorch's own bf16 (typical ratio; validate failed those honest exports)."""
        inline = self.metadata.get("bodies") == "inline"
        if inline and not self.upcast:
            return core.read_model(str(self.path))  # OpenVINO reads external data itself
        import onnx

        from .export import ExportError, inline_xlstm

        model = onnx.load(str(self.path))  # loads external data too
        if not inline:
            try:
                model = inline_xlstm(model)
            except ExportError as e:
                raise NotAnXLSTMModelError(f"{self.path}: cannot inline its xlstm nodes: {e}") from None
        if self.upcast:
            model = _upcast_keeping_bf16_weights(model)
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


def _upcast_keeping_bf16_weights(model):
    """:func:`ort.upcast_bfloat16` (float32 arithmetic, the graph's own Casts to bfloat16 kept as
    rounding points: the numbers onnxruntime computes), with the top graph's bfloat16 weights kept
    bfloat16 and widened by a Cast that reads them (OpenVINO's weight decompression), so the
    weights do not take twice their memory. Modifies ``model`` in place."""
    import onnx
    from onnx import TensorProto

    g = model.graph
    kept = [t for t in g.initializer if t.data_type == TensorProto.BFLOAT16]
    others = [t for t in g.initializer if t.data_type != TensorProto.BFLOAT16]
    del g.initializer[:]  # the weights step aside (not widened), the rest of the graph is
    g.initializer.extend(others)
    upcast_bfloat16(model)
    casts = []
    for t in kept:
        casts.append(onnx.helper.make_node("Cast", [f"{t.name}__bf16"], [t.name], to=TensorProto.FLOAT,
                                           name=f"{t.name}__widen"))
        t.name = f"{t.name}__bf16"
    g.initializer.extend(kept)
    nodes = casts + list(g.node)  # they read initializers only: they may go first
    del g.node[:]
    g.node.extend(nodes)
    return model
