"""Export an xLSTMLM to ONNX with ``xlstm::mLSTM`` / ``xlstm::sLSTM`` nodes carrying function bodies.

    from xlstm_export.export import export_onnx
    export_onnx(model, "model.onnx", dtype="fp16")     # -> Path("model.onnx")

The graph (B = "batch", S = "sequence", both dynamic; every other dim static)::

    inputs   input_ids [B, S] int64, past.{i}.{t} (float32, batch first) for every state key "{i}.{t}"
    outputs  logits [B, S, vocab] (the export dtype), present.{i}.{t} (float32, same shape as past)

All-zero ``past.*`` is a fresh sequence; the same graph serves prefill (S > 1) and decode (S = 1).
The head reads positions ``logits_from:`` of the last block's output, where ``logits_from`` is an
int64 (1,) initializer holding 0 (every position); onnxruntime callers can ask for the last
position's logits alone (``OrtModel.run(..., logits="last")`` feeds -1 in memory), every other
runtime sees the constant and the interface above.
Each cell call is ONE node in domain ``xlstm`` (attributes plugin_namespace="xlstm",
plugin_version="1", plus chunk_size and eps for mLSTM) backed by a model-local function in standard
ops (:mod:`xlstm_export.onnx_functions`): onnxruntime runs the file as is, TensorRT takes the plugin.

Exporter choice: the dynamo exporter (``torch.export`` + ``torch.onnx.export(dynamo=True)``) with a
``custom_translation_table``. With torch 2.13 / onnxscript 0.7 it is the maintained path: the
TorchScript exporter (``dynamo=False``, ``register_custom_op_symbolic``) is deprecated, traces with
fixed shapes unless every dynamic axis is re-declared, and cannot see through ``torch.library``
custom ops without a second registration. ``torch.export`` keeps each custom op as one opaque node
whose fake implementation (from the contract) gives symbolic output shapes, so B and S stay dynamic
without guards; the translation table maps the op to one ``xlstm`` node, onnxscript finds its
output count in the ONNX schema we register. We call ``torch.export.export(strict=False)`` ourselves
so a tracing failure surfaces as one clear error instead of the exporter's silent fall-backs. After
export the file is post-processed: function bodies attached (their ai.onnx opset = the model's),
attributes completed, metadata added, then checked with ``onnx.checker.check_model(full_check=True)``.

float16 / bfloat16: the model is converted on a copy; states stay float32. torch emits a few ops
that ONNX does not define for bfloat16 at opset 18 (Conv, Einsum): those nodes get float32 Casts
around them (``_legalize_low_precision``), everything else stays in the export dtype.

Files are written into a temporary folder beside the target and moved into place only after the
check passes (:func:`xlstm_export.fsio.staged_files`): a failed export leaves no partial output. Weights over 2 GB (or ``external_data=True``)
go to ``<name>.data`` beside the model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from . import contract, external_data, onnx_functions
from .kernels import custom_op as _ops  # defines torch.ops.xlstm.*, which the translation table names
from .contract import DOMAIN
from .fsio import staged_files
from .graph_rewrite import STANDARD_DOMAINS, Edit, GraphIndex, Rule, all_nodes, apply_rules, opset_version
from .interface import LOGITS_FROM, METADATA_PREFIX, state_input_name, state_output_name
from .models.model import resolve_dtype
from .tokenizer import same_tokenizer_files, tokenizer_files_in, write_tokenizer_files

__all__ = [
    "BATCH_DIM",
    "DEFAULT_OPSET",
    "METADATA_PREFIX",
    "SEQUENCE_DIM",
    "ExportError",
    "export_onnx",
    "inline_xlstm",
    "state_input_name",
    "state_output_name",
]

DEFAULT_OPSET = 18  # ai.onnx opset: torchlib's native opset, parsed by TensorRT >= 8.6 and every ORT >= 1.14
BATCH_DIM = "batch"  # dim_param of the dynamic batch dim
SEQUENCE_DIM = "sequence"  # dim_param of the dynamic sequence dim
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with room for the graph
PRODUCER_NAME = "xlstm-export"  # ModelProto.producer_name of every file this tool writes
FORMAT_VERSION = "1"


class ExportError(RuntimeError):
    """The model could not be exported (tracing, translation or checking failed)."""


# ---------------------------------------------------------------------------------------------
# torch side: a flat-signature wrapper and the translation table
# ---------------------------------------------------------------------------------------------


class _FlatLM(torch.nn.Module):
    """(input_ids, *past in state_spec order, logits_from) -> (logits, *present in the same order).

    ``logits_from`` (int64 (1,)): the head (out_norm, lm_head) sees positions ``logits_from:`` of
    the last block's output (Python slice semantics: 0 = all, -1 = the last one), so a prefill
    that needs only the next token's logits computes one row of the vocabulary product. The
    written file holds it as the constant 0 (see :data:`LOGITS_FROM`).
    """

    def __init__(self, model: torch.nn.Module, keys: list[str]):
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, input_ids: torch.Tensor, *past_and_from: torch.Tensor):
        *past, logits_from = past_and_from
        S = input_ids.shape[1]
        start = logits_from[0].item()
        torch._check(start >= -S)
        torch._check(start < S)
        # per-position head: slicing its input equals slicing the logits
        head = self.model.out_norm if self.model.out_norm is not None else self.model.lm_head
        hook = head.register_forward_pre_hook(lambda _, args: (args[0][:, start:], *args[1:]))
        try:
            logits, state = self.model(input_ids, dict(zip(self.keys, past)))
        finally:
            hook.remove()
        return (logits, *(state[k] for k in self.keys))


def _translation_table() -> dict:
    import onnxscript

    contract.register_onnx_schemas()  # onnxscript reads the output count from the schema
    xlstm_opset = onnxscript.values.Opset(DOMAIN, contract.VERSION)

    def mlstm(q, k, v, i, f, c0, n0, m0, chunk_size: int = 64, eps: float = 1e-6):
        return xlstm_opset.mLSTM(q, k, v, i, f, c0, n0, m0, chunk_size=chunk_size, eps=eps,
                                 plugin_namespace=contract.PLUGIN_NAMESPACE,
                                 plugin_version=contract.PLUGIN_VERSION)

    def slstm(x, r, b, h0, c0, n0, m0):
        return xlstm_opset.sLSTM(x, r, b, h0, c0, n0, m0,
                                 plugin_namespace=contract.PLUGIN_NAMESPACE,
                                 plugin_version=contract.PLUGIN_VERSION)

    return {torch.ops.xlstm.mLSTM.default: mlstm, torch.ops.xlstm.sLSTM.default: slstm}


@contextlib.contextmanager
def _export_copy(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """The model in ``dtype`` with the "custom_op" backend, leaving the caller's model untouched.

    Same dtype: the model itself, backends and train/eval mode restored afterwards (no weight copy).
    Other dtype: a deep copy converted to ``dtype`` (the caller's weights are never rounded).
    """
    blocks = list(getattr(model, "blocks", []))
    saved_backends = [getattr(b, "backend", None) for b in blocks]
    was_training = model.training
    param = next(model.parameters(), None)
    same = param is None or param.dtype == dtype
    target = model if same else copy.deepcopy(model).to(dtype)
    try:
        target.eval()
        target.set_backend(_ops.BACKEND_NAME)
        yield target
    finally:
        if same:
            for b, name in zip(blocks, saved_backends):
                if name is not None:
                    b.backend = name
            model.train(was_training)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """Silence torch.onnx's INFO/WARNING chatter (e.g. "torchvision is not installed")."""
    import logging

    names = ["torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export", "torch._export"]
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _export_program(model, keys: list[str], spec: dict[str, tuple[int, ...]], opset: int,
                    optimize: bool = True):
    """torch.export (non-strict, dynamic batch and sequence) -> torch.onnx ONNXProgram (optimised
    unless ``optimize=False``: a meta model's weights are bound first, see export_stream.py)."""
    from torch.export import Dim

    device = next(model.parameters()).device
    B, S = 2, 3  # example sizes >= 2 so that neither dim is specialised
    example_ids = torch.randint(0, model.config.vocab_size, (B, S), device=device)
    example_state = [torch.zeros((B, *spec[k][1:]), dtype=torch.float32, device=device) for k in keys]
    batch = Dim(BATCH_DIM, min=1, max=1 << 20)
    seq = Dim(SEQUENCE_DIM, min=1, max=1 << 30)
    logits_from = torch.zeros(1, dtype=torch.int64)  # on the CPU even for a meta model: read by .item()
    dynamic_shapes = ({0: batch, 1: seq}, (*({0: batch} for _ in keys), None))  # (ids, *past, logits_from)
    flat = _FlatLM(model, keys).eval()
    with torch.no_grad(), warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")
        try:
            exported = torch.export.export(flat, (example_ids, *example_state, logits_from),
                                           dynamic_shapes=dynamic_shapes,
                                           strict=False)
        except Exception as e:
            raise ExportError(f"torch.export could not trace the model with dynamic batch and "
                              f"sequence dims: {type(e).__name__}: {e}") from e
        try:
            program = torch.onnx.export(
                exported, dynamo=True, opset_version=opset, verbose=False, optimize=optimize,
                custom_translation_table=_translation_table(),
                input_names=["input_ids", *(state_input_name(k) for k in keys), LOGITS_FROM],
                output_names=["logits", *(state_output_name(k) for k in keys)],
            )
        except Exception as e:
            raise ExportError(f"torch.onnx could not translate the exported program: "
                              f"{type(e).__name__}: {e}") from e
    return program


# ---------------------------------------------------------------------------------------------
# ONNX side: post-processing
# ---------------------------------------------------------------------------------------------


def _model_opset(model: onnx.ModelProto) -> int:
    opset = opset_version(model.opset_import)
    if opset is None:
        raise ExportError("exported model imports no ai.onnx opset")
    return opset


def _postprocess(model: onnx.ModelProto, *, keys: list[str], spec: dict[str, tuple[int, ...]],
                 vocab: int, dtype: str, config_json: str | None, data_folder: Path | None = None) -> onnx.ModelProto:
    """Attach function bodies, complete the xlstm nodes' attributes, fix names/dims, add metadata.
    ``data_folder``: the folder of the model's external-data file, which the fusions may rewrite."""
    opset = _model_opset(model)
    used = []
    for node in all_nodes(model.graph):
        if node.domain != DOMAIN:
            continue
        op = contract.get_op(node.op_type)
        have = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        have = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in have.items()}
        full = op.validate_attrs(have)
        for name, value in full.items():
            if name not in have:
                node.attribute.append(onnx.helper.make_attribute(name, value))
        if op.name not in used:
            used.append(op.name)
    if not used:
        raise ExportError("the exported graph holds no xlstm node: the cells were not routed through "
                          "torch.ops.xlstm (is the model an xLSTMLM with set_backend?)")
    del model.functions[:]
    model.functions.extend(onnx_functions.functions(opset, used))
    _rsqrt_as_div(model.graph)
    _fuse_sibling_matmuls(model.graph, data_folder)
    _layer_norms_with_bias(model.graph)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, contract.VERSION))

    # graph interface: names, dtypes and dims exactly as documented
    want_in = {"input_ids": [BATCH_DIM, SEQUENCE_DIM]}
    want_out = {"logits": [BATCH_DIM, SEQUENCE_DIM, vocab]}
    for k in keys:
        want_in[state_input_name(k)] = [BATCH_DIM, *spec[k][1:]]
        want_out[state_output_name(k)] = [BATCH_DIM, *spec[k][1:]]
    _logits_from_as_constant(model.graph)
    _fix_dims(model.graph.input, want_in, "input")
    _fix_dims(model.graph.output, want_out, "output")

    meta = {
        "format": FORMAT_VERSION,
        "dtype": dtype,
        "state_names": json.dumps(keys),
        "ops": json.dumps(used),
    }
    if config_json is not None:
        meta["config"] = config_json
    kept = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in kept},
                                        **{METADATA_PREFIX + k: v for k, v in meta.items()}})
    model.producer_name = PRODUCER_NAME
    return model


def _logits_from_as_constant(graph: onnx.GraphProto) -> None:
    """The traced ``logits_from`` input becomes an initializer holding 0 (logits for every position):
    the file's interface stays input_ids + past.* for every runtime (TensorRT and OpenVINO fold it
    away); :class:`xlstm_export.ort.OrtModel` makes it an input again in memory (logits="last")."""
    inputs = [i for i in graph.input if i.name != LOGITS_FROM]
    if len(inputs) == len(graph.input):
        raise ExportError(f"the traced graph has no {LOGITS_FROM!r} input")
    del graph.input[:]
    graph.input.extend(inputs)
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.int64), LOGITS_FROM))


def _fusable_weight(index: GraphIndex, node: onnx.NodeProto, external: bool = False) -> onnx.TensorProto | None:
    """The constant 2-D weight of a standard MatMul that reads it alone: loaded in memory, or also
    held as external data where ``external`` says the pass can rewrite the data file."""
    w = index.inits.get(node.input[1]) if node.op_type == "MatMul" and not node.domain else None
    if w is None or len(w.dims) != 2 or len(index.readers.get(w.name, [])) != 1:
        return None
    return w if external or w.data_location != onnx.TensorProto.EXTERNAL else None


def _match_sibling_matmuls(index: GraphIndex, node: onnx.NodeProto, external: bool = False) -> list[onnx.NodeProto] | None:
    """Pattern: ``node`` is the first of >= 2 MatMuls that read the same activation x, each with
    its own constant [K, N_j] weight of the same K and dtype (:func:`_fusable_weight`)."""
    w = _fusable_weight(index, node, external)
    if w is None:
        return None
    siblings = [n for n in index.readers[node.input[0]] if n.input[0] == node.input[0] and index.holds(n)
                and (s := _fusable_weight(index, n, external)) is not None
                and (s.dims[0], s.data_type) == (w.dims[0], w.data_type)]
    return siblings if len(siblings) >= 2 and siblings[0] is node else None


def _fuse_siblings(edit: Edit, nodes: list[onnx.NodeProto], pending: dict | None = None) -> None:
    """Replacement: ONE MatMul over the weights concatenated along N, then a Split into the
    original outputs, where the first MatMul stood. Where a weight is external data, the fused one
    is an external tensor whose bytes :func:`external_data.rewrite` writes later; ``pending``
    collects its parts."""
    x = nodes[0].input[0]
    parts = [edit.index.inits[n.input[1]] for n in nodes]  # (K, N_j) each
    fused_name = f"{nodes[0].input[1]}__fused{len(nodes)}"
    split_name = f"{fused_name}__split"
    if any(p.data_location == onnx.TensorProto.EXTERNAL for p in parts):
        edit.add_initializer(external_data.pending(fused_name, parts))  # (K, sum N_j), written later
        pending[fused_name] = [copy.deepcopy(p) for p in parts]  # the graph drops the originals
    else:
        weights = [numpy_helper.to_array(p) for p in parts]
        edit.add_initializer(numpy_helper.from_array(np.concatenate(weights, axis=1), fused_name))  # (K, sum N_j)
    edit.add_initializer(numpy_helper.from_array(np.array([p.dims[1] for p in parts], np.int64), split_name))
    edit.drop_initializers(n.input[1] for n in nodes)
    y = f"{nodes[0].output[0]}__fused"
    edit.replace(nodes, [
        onnx.helper.make_node("MatMul", [x, fused_name], [y], name=f"{nodes[0].name}_fused"),
        onnx.helper.make_node("Split", [y, split_name], [n.output[0] for n in nodes], axis=-1,
                              name=f"{nodes[0].name}_fused_split"),
    ], at=nodes[0])


SIBLING_MATMULS = Rule("sibling MatMuls -> one MatMul + Split", _match_sibling_matmuls, _fuse_siblings)


def _fuse_sibling_matmuls(graph: onnx.GraphProto, data_folder: Path | None = None) -> int:
    """MatMuls that read the same activation with their own constant 2-D weights become ONE MatMul
    over the weights concatenated along N, followed by a Split into the original outputs.

    The function is unchanged (every output column is the same dot product over K); the graph runs
    fewer, larger products: in a 7B-style block q, k, v, the output gate and the i / f gates read
    the same normed input (six MatMuls -> one), and the SwiGLU's two up-projections (two -> one).
    That is fewer nodes for the per-node overhead of small models, and fewer, better-shaped GEMVs
    at decode. Weights used by any other node are left alone. Weights held as external data are
    fused where ``data_folder`` (the folder of their data file) is given: the data file is then
    rewritten with the fused weights in place of their parts (:mod:`.external_data`, in bounded
    memory); without it they are left alone. Returns the number of groups fused.
    """
    if data_folder is None:
        return apply_rules(graph, [SIBLING_MATMULS])[SIBLING_MATMULS.name]
    pending: dict[str, list[onnx.TensorProto]] = {}
    rule = Rule(SIBLING_MATMULS.name, functools.partial(_match_sibling_matmuls, external=True),
                functools.partial(_fuse_siblings, pending=pending))
    fused = apply_rules(graph, [rule])[rule.name]
    if pending:
        external_data.rewrite(graph, data_folder, pending)
    return fused


def _match_rsqrt_mul(index: GraphIndex, rec: onnx.NodeProto) -> tuple | None:
    """Pattern: ``Reciprocal(Sqrt(v))`` read only by Muls of the main graph (none squaring it),
    no graph output."""
    r = rec.output[0] if rec.op_type == "Reciprocal" and not rec.domain else None
    if r is None or r in index.outputs or r in index.nested:
        return None
    sqrt = index.producer.get(rec.input[0])
    users = index.readers.get(r, [])
    if sqrt is None or sqrt.op_type != "Sqrt" or not users:
        return None
    if any(u.op_type != "Mul" or u.domain or list(u.input) == [r, r] for u in users):
        return None
    return rec, sqrt, users


def _mul_as_div(edit: Edit, found: tuple) -> None:
    """Replacement: each ``Mul(x, Reciprocal(Sqrt(v)))`` becomes ``Div(x, Sqrt(v))`` where it
    stands; the Reciprocal goes."""
    rec, sqrt, users = found
    r = rec.output[0]
    for mul in users:
        other = mul.input[1] if mul.input[0] == r else mul.input[0]
        mul.op_type = "Div"
        del mul.input[:]
        mul.input.extend([other, sqrt.output[0]])
    edit.replace([rec], [])


RSQRT_AS_DIV = Rule("x * Reciprocal(Sqrt(v)) -> x / Sqrt(v)", _match_rsqrt_mul, _mul_as_div)


def _rsqrt_as_div(graph: onnx.GraphProto) -> int:
    """Rewrite ``Mul(x, Reciprocal(Sqrt(v)))`` as ``Div(x, Sqrt(v))``.

    torch exports ``x * rsqrt(v)`` (our RMSNorm) as Sqrt -> Reciprocal -> Mul. onnxruntime fuses
    RMSNorm into one SimplifiedLayerNormalization node only from the Sqrt -> Div form, so the
    7B-style blocks' norms go from 7 nodes to 1. Same value up to the rounding of one division.
    The eager model keeps rsqrt (the official implementations' form). Returns the Reciprocals removed.
    """
    return apply_rules(graph, [RSQRT_AS_DIV])[RSQRT_AS_DIV.name]


def _layer_norms_with_bias(graph: onnx.GraphProto) -> int:
    """Give each ``LayerNormalization`` of the main graph without a bias an explicit zero bias
    (a constant of its scale's shape and dtype). The function is the same.

    torch exports a bias-free LayerNorm (the paper blocks', the heads' norms) with two inputs, as
    ONNX allows. onnxruntime 1.16-1.18's AttentionFusion pass reads a LayerNormalization's third
    input unconditionally and aborts the process on the paper export ("Assertion '__n < this->size()'
    failed"; fixed in 1.19, bench/RESULTS.md "Runtime releases"); Triton releases ship such
    onnxruntimes. A scale that is not a constant is left alone. Returns the biases added."""
    inits = {t.name: t for t in graph.initializer}
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    added = 0
    for node in graph.node:
        if node.op_type != "LayerNormalization" or node.domain or (len(node.input) > 2 and node.input[2]):
            continue
        scale = inits.get(node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            continue
        name = f"{scale.name}__zero_bias"
        if name not in taken:
            size = math.prod(scale.dims) * onnx.helper.tensor_dtype_to_np_dtype(scale.data_type).itemsize
            graph.initializer.append(onnx.helper.make_tensor(name, scale.data_type, list(scale.dims),
                                                             bytes(size), raw=True))
            taken.add(name)
        del node.input[2:]
        node.input.append(name)
        added += 1
    return added


def _fix_dims(values, want: dict[str, list], kind: str) -> None:
    names = [v.name for v in values]
    if sorted(names) != sorted(want):
        raise ExportError(f"exported graph {kind}s {names} differ from the expected {sorted(want)}")
    for v in values:
        shape = v.type.tensor_type.shape
        dims = want[v.name]
        if len(shape.dim) != len(dims):
            raise ExportError(f"graph {kind} {v.name}: rank {len(shape.dim)}, expected {len(dims)} {dims}")
        for d, w in zip(shape.dim, dims):
            if isinstance(w, str):
                d.dim_param = w
            else:
                if d.HasField("dim_value") and d.dim_value != w:
                    raise ExportError(f"graph {kind} {v.name}: dims {shape}, expected {dims}")
                d.dim_value = w


def _allowed_types(schema, param) -> set[str]:
    for tc in schema.type_constraints:
        if tc.type_param_str == param.type_str:
            return set(tc.allowed_type_strs)
    return {param.type_str}


def _legalize_low_precision(model: onnx.ModelProto, dtype: str, max_rounds: int = 64) -> int:
    """Run standard ops that do not accept ``dtype`` at the model's opset in float32.

    torch emits some ops in bfloat16 that ONNX does not define for it at opset 18 (Conv before
    opset 22, Einsum in every opset). Each such node gets Cast-to-float32 on its ``dtype`` inputs
    and Cast-back on the outputs that follow the same type parameter, so the graph is valid ONNX
    and still bfloat16 everywhere else. Repeats type inference until nothing changes (an illegal
    node hides the types downstream of it). Returns the number of nodes wrapped.
    """
    elem = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}[dtype]
    tstr = {"float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)"}[dtype]
    opset = _model_opset(model)
    wrapped = 0
    for _ in range(max_rounds):
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
        g = inferred.graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
        types.update({t.name: t.data_type for t in g.initializer})
        index = GraphIndex(model.graph)
        edit = Edit(index)
        for node in index.nodes:
            bad = _illegal_params(node, opset, types, elem, tstr)
            if bad:
                edit.replace([node], _wrapped_in_float32(node, bad, types, elem))
        if not edit.changed:
            return wrapped
        wrapped += edit.changed
        edit.apply()
    raise ExportError(f"could not legalise the {dtype} graph in {max_rounds} rounds")


def _illegal_params(node: onnx.NodeProto, opset: int, types: dict, elem: int, tstr: str):
    """(schema, the type parameters of a standard ``node`` that ``elem`` inputs bind to a type
    the schema does not allow), or None where every input is allowed. A wrapped node has float32
    inputs: it is not seen again."""
    if node.domain not in STANDARD_DOMAINS:
        return None
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return None
    bad_params = set()
    for idx, name in enumerate(node.input):
        if not name or types.get(name) != elem or not schema.inputs:
            continue
        param = schema.inputs[min(idx, len(schema.inputs) - 1)]
        if tstr not in _allowed_types(schema, param):
            bad_params.add(param.type_str)
    return (schema, bad_params) if bad_params else None


def _wrapped_in_float32(node: onnx.NodeProto, bad, types: dict, elem: int) -> list[onnx.NodeProto]:
    """Cast-to-float32 before ``node`` on its ``elem`` inputs, ``node`` (changed in place), and
    Cast-back after it on the outputs that follow an illegal type parameter."""
    schema, bad_params = bad
    before, back = [], []
    for idx, name in enumerate(node.input):
        if name and types.get(name) == elem:
            cast_name = f"{name}__f32_{node.name}_{idx}"
            before.append(onnx.helper.make_node(
                "Cast", [name], [cast_name], to=onnx.TensorProto.FLOAT, name=f"{cast_name}_cast"))
            node.input[idx] = cast_name
    for j, out in enumerate(node.output):
        param = schema.outputs[min(j, len(schema.outputs) - 1)] if schema.outputs else None
        if out and param is not None and param.type_str in bad_params:
            tmp = f"{out}__f32"
            node.output[j] = tmp
            back.append(onnx.helper.make_node("Cast", [tmp], [out], to=elem, name=f"{out}_cast_back"))
    return [*before, node, *back]


def inline_xlstm(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every ``xlstm`` node replaced by its function body (standard ops only, no
    local functions, no ``xlstm`` opset import); metadata ``bodies`` = "inline" says so. The
    weights are not touched (external data keeps its references)."""
    import onnx.inliner

    inlined = onnx.inliner.inline_local_functions(model)
    left = sorted({n.op_type for n in all_nodes(inlined.graph) if n.domain == DOMAIN})
    if left or len(inlined.functions):
        raise ExportError(f"inlining left xlstm nodes {left} / {len(inlined.functions)} functions")
    kept = [o for o in inlined.opset_import if o.domain != DOMAIN]
    del inlined.opset_import[:]
    inlined.opset_import.extend(kept)
    inlined.metadata_props.add(key=METADATA_PREFIX + "bodies", value="inline")
    return inlined


def _check_interface(model: onnx.ModelProto, keys: list[str], dtype: str) -> None:
    elem = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
            "bfloat16": onnx.TensorProto.BFLOAT16}[dtype]
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    if types["input_ids"] != onnx.TensorProto.INT64:
        raise ExportError("input_ids must be int64 in the exported graph")
    if types["logits"] != elem:
        raise ExportError(f"logits are {onnx.TensorProto.DataType.Name(types['logits'])}, expected {dtype}")
    for k in keys:
        for name in (state_input_name(k), state_output_name(k)):
            if types[name] != onnx.TensorProto.FLOAT:
                raise ExportError(f"state {name} must be float32, got "
                                  f"{onnx.TensorProto.DataType.Name(types[name])}")


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    progress: bool = True,
    external_data: bool | None = None,
    inline: bool = False,
    weights: Any = None,
) -> Path:
    """Export ``model`` (an xLSTMLM) to ``path``; returns the path of the written .onnx file.

    dtype: "fp32" | "fp16" | "bf16" (weights and logits; states stay float32).
    progress: a tqdm bar over the export's stages on stderr (False: none).
    opset: ai.onnx opset (>= 18). external_data: None = automatic (weights over ~2 GB go to
    ``<name>.data``), True / False to force; a ``<name>.data`` left by an earlier export to ``path``
    that the new file does not use is removed (unless another .onnx beside it reads it).
    inline: write standard ops only (the function bodies inlined, no ``xlstm`` nodes, no local
    functions; :func:`inline_xlstm`) for runtimes that take neither custom domains nor local
    functions (OpenVINO). The caller's model is not modified.
    weights: for a model built on the meta device, the source of its tensors
    (:class:`xlstm_export.export_stream.StreamedWeights`, used by ``export_checkpoint``): they are
    read from the checkpoint one at a time while the file is written.
    Raises ValueError for bad arguments, OSError for an unwritable destination, ExportError when
    tracing, translation or the ONNX checker fails; nothing is left at ``path`` on failure.
    """
    contract.register_onnx_schemas()
    dt = contract.canonical_dtype(dtype)
    if not isinstance(opset, int) or opset < onnx_functions.DEFAULT_OPSET:
        raise ValueError(f"opset must be an int >= {onnx_functions.DEFAULT_OPSET}, got {opset!r}")
    if not (external_data is None or isinstance(external_data, bool)) or not isinstance(inline, bool):
        raise ValueError(f"external_data must be None, True or False and inline True or False, got "
                         f"external_data={external_data!r}, inline={inline!r}")  # "no" would count as True
    for attr in ("state_spec", "set_backend", "config", "blocks"):
        if not hasattr(model, attr):
            raise ValueError(f"export_onnx needs an xLSTMLM (xlstm_export.models); "
                             f"{type(model).__name__} has no {attr!r}")
    if weights is None and any(p.is_meta for p in model.parameters()):
        raise ValueError("the model is on the meta device (shapes, no weights): export a checkpoint directory "
                         "with export_stream.export_checkpoint, or load the model first")
    out = Path(path)
    if out.suffix != ".onnx":
        raise ValueError(f"output path must end in .onnx, got {str(out)!r}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise OSError(f"cannot write {out}: {parent} {why}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"cannot write {out}: directory {parent} is not writable")
    if out.is_dir():
        raise OSError(f"cannot write {out}: it is a directory")

    tokenizer_files = getattr(model, "tokenizer_files", None) or {}
    stale = _stale_tokenizer_files(out, parent, tokenizer_files)
    spec = model.state_spec(1)
    keys = list(spec)
    vocab = int(model.config.vocab_size)
    config_json = model.config.to_json() if hasattr(model.config, "to_json") else None

    stages = ["trace + translate", "function bodies", "save", "check", "move into place"]
    bar = _progress(stages, progress, f"export {out.name} ({dt})")
    try:
        # data first: a visible .onnx always has its data (and tokenizer files) beside it
        data_name = out.name + ".data"  # where the weights go when they go beside the model
        with staged_files(parent, last=out.name) as tmpdir:
            _export_into(tmpdir / out.name, model, bar, dt=dt, keys=keys, spec=spec, vocab=vocab,
                         config_json=config_json, opset=opset, external_data=external_data, inline=inline,
                         weights=weights)
            write_tokenizer_files(tokenizer_files, tmpdir)  # self-contained export
            if not (tmpdir / data_name).exists() and not _data_read_by_others(parent, data_name, out.name):
                stale.append(data_name)  # a previous export's weights, read by no model now
        for name in stale:  # the previous export's, which this model would be read with
            (parent / name).unlink(missing_ok=True)
        bar.update()
    finally:
        bar.close()
    return out


def _data_read_by_others(parent: Path, data_name: str, own: str) -> bool:
    """Whether an .onnx in ``parent`` other than ``own`` keeps weights in ``data_name`` (a renamed copy
    of an export still reads its original's data file). Unreadable files count as readers."""
    for p in parent.glob("*.onnx"):
        if p.name == own or not p.is_file():
            continue
        try:
            m = onnx.load(str(p), load_external_data=False)
        except Exception:
            return True
        if any(e.key == "location" and e.value == data_name
               for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data):
            return True
    return False


def _stale_tokenizer_files(out: Path, parent: Path, files: dict[str, bytes]) -> list[str]:
    """The tokenizer files beside ``out`` (in ``parent``) that this export does not write (runtimes
    read a model's tokenizer from the files beside it): removed once the export is in place. Where
    the folder holds another export of this tool (which reads those files) and the new ones differ,
    the export is refused (ValueError) instead: one folder, one tokenizer. Other .onnx files (a
    ResNet beside it) read no tokenizer and do not count."""
    present = tokenizer_files_in(parent)
    if same_tokenizer_files(present, files):
        return []
    others = sorted(p.name for p in parent.glob("*.onnx") if p.name != out.name and _made_here(p))
    if others:
        held = f"the tokenizer files {', '.join(sorted(present))}" if present else "no tokenizer files"
        why = "has no tokenizer" if not files else "carries other tokenizer files" if present else \
            "carries tokenizer files"
        raise ValueError(f"cannot write {out}: {parent} holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} "
                         f"with {held}, and this model {why}; export it into a folder of its own")
    return [n for n in present if n not in files]


def _made_here(path: Path) -> bool:
    """Whether the .onnx at ``path`` was written by this tool, read from the file's first bytes: a
    ModelProto serialises ir_version (field 1: tag 0x08, a varint) and producer_name (field 2: tag
    0x12, its length, the bytes) before its graph, so no weights are read. Unreadable: False."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    end = 1  # past ir_version's varint: its bytes with the high bit set, then one without
    while end < len(head) and head[end] & 0x80:
        end += 1
    name = PRODUCER_NAME.encode()
    return head[:1] == b"\x08" and head[end + 1:end + 3 + len(name)] == b"\x12" + bytes([len(name)]) + name


def _export_into(tmp_model: Path, model, bar, *, dt: str, keys: list[str], spec: dict, vocab: int,
                 config_json: str | None, opset: int, external_data: bool | None, inline: bool, weights) -> None:
    """The export's stages up to a checked ``tmp_model`` (and its data file) in a staging folder."""
    with _export_copy(model, resolve_dtype(dt)) as m:
        program = _export_program(m, keys, spec, opset, optimize=weights is None)
    if weights is not None:
        weights.bind(program)  # optimises with the checkpoint's tensors bound lazily
    bar.update()

    weight_bytes = sum(p.numel() for p in model.parameters()) * resolve_dtype(dt).itemsize
    use_external = external_data if external_data is not None else weight_bytes > EXTERNAL_DATA_THRESHOLD
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program.save(tmp_model, external_data=use_external)
    del program
    proto = onnx.load(tmp_model, load_external_data=False)
    proto = _postprocess(proto, keys=keys, spec=spec, vocab=vocab, dtype=dt, config_json=config_json,
                         data_folder=tmp_model.parent if use_external else None)
    if dt != "float32":
        _legalize_low_precision(proto, dt)
    if inline:
        proto = inline_xlstm(proto)
    _check_interface(proto, keys, dt)
    bar.update()

    onnx.save_model(proto, tmp_model)  # external tensors keep their references to <name>.data
    del proto
    bar.update()

    try:
        onnx.checker.check_model(str(tmp_model), full_check=True)
    except Exception as e:
        raise ExportError(f"the exported model fails onnx.checker (full_check): {e}") from e
    bar.update()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(stages: list[str], enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(stages), desc=desc, unit="stage", leave=True)
    names = iter(stages)
    first = next(names)
    bar.set_postfix_str(first)
    original = bar.update

    def update(n: int = 1) -> Any:
        r = original(n)
        nxt = next(names, None)
        if nxt is not None:
            bar.set_postfix_str(nxt)
        return r

    bar.update = update  # type: ignore[method-assign]
    return bar
