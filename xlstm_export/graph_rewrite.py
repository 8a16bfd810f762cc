"""The one graph-rewrite mechanism of every pass over an ONNX graph (export's legalisation and
fusions, :func:`xlstm_export.ort.upcast_bfloat16`, the native folds of :mod:`xlstm_export.ort_native`).

A pass states each rewrite as a :class:`Rule`: a pattern with its check (``match``: walks producers
and readers from one anchor node through a :class:`GraphIndex`, returns what it found or None where
the graph differs anywhere) and a replacement (``rewrite``: records the new nodes on an
:class:`Edit`). :func:`apply_rules` runs rules over a graph::

    index = GraphIndex(graph)                    # producers, readers, constants: built once
    edit = Edit(index)
    for node in index.nodes:                     # graph order
        found = rule.match(index, node)          # pattern + check
        if found is not None:
            rule.rewrite(edit, found)            # replacement nodes, new initializers
    edit.apply()                                 # graph.node rebuilt once, order kept

Passes that are not patterns (type-driven ones: wrap every node that a dtype makes illegal) use the
same index and edit. Matches see the graph as it was when the index was built; a replacement goes
where the last node it replaces stood (every reader of their outputs comes after it) unless it
names another place.

Why not onnxscript's rewriter (onnxscript 0.7.2 / onnx_ir 1.1.0, whose rule style this follows):
it runs on its own IR, so each pass pays ModelProto -> ir.Model -> ModelProto (measured on the
xlstm-large-160m export, 657 MB: 0.04 s in, 0.58 s back out; the whole native rewrite of that
model takes 1.7-3.1 s with this module, 3.6-4.7 s with the per-pass indexes it replaced), and it
changes more than the match: every new node gets a rule-name metadata entry, values are renamed
(NameFixPass) and constants propagated, so exported files would no longer be byte-identical to
what the passes wrote before. What the passes here need is producers, readers, constants and
ordered replacement on the protobuf itself: this one module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, TensorProto, helper, numpy_helper

__all__ = ["STANDARD_DOMAINS", "Edit", "GraphIndex", "Rule", "all_nodes", "apply_rules", "attrs",
           "delete_initializers", "drop_dead_nodes", "graphs", "opset_version", "subgraphs"]

STANDARD_DOMAINS = ("", "ai.onnx")


def subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    """The graphs held by ``node``'s attributes (If branches, Loop / Scan bodies)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def all_nodes(graph: GraphProto) -> Iterator[NodeProto]:
    """Every node of ``graph`` and of its subgraphs, depth first in graph order."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from all_nodes(sub)


def graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """``graph`` and every subgraph inside it."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from graphs(sub)


def attrs(node: NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def opset_version(imports, default: int | None = None) -> int | None:
    """The ai.onnx version in an opset_import list (a model's or a function's)."""
    return next((o.version for o in imports if o.domain in STANDARD_DOMAINS), default)


class GraphIndex:
    """Producers, readers and constants of one graph (its nodes as they are now).

    Readers include the nodes of subgraphs (a value a Loop body reads is not private to one node
    of the graph). ``nodes`` is the graph's node list; a pass walks it, not ``graph.node``, so that
    the nodes it finds through the index are the same objects it edits.
    """

    def __init__(self, graph: GraphProto):
        self.graph = graph
        self.nodes: list[NodeProto] = list(graph.node)
        self._position = {id(n): j for j, n in enumerate(self.nodes)}
        self.inits: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.readers: dict[str, list[NodeProto]] = {}
        self.nested: set[str] = set()  # names read inside subgraphs
        for node in self.nodes:
            for x in node.input:
                if x:
                    self.readers.setdefault(x, []).append(node)
            for sub in subgraphs(node):
                for inner in all_nodes(sub):
                    for x in inner.input:
                        if x:
                            self.readers.setdefault(x, []).append(inner)
                            self.nested.add(x)
        self.outputs = {o.name for o in graph.output}
        self.fed = {i.name for i in graph.input}  # an initializer listed as a graph input can be fed
        self._shapes: dict[str, list] | None = None

    def holds(self, node: NodeProto) -> bool:
        """``node`` is one of this graph's own nodes (not of a subgraph)."""
        return id(node) in self._position

    def position(self, node: NodeProto) -> int:
        """Where ``node`` (of this graph's ``nodes``) stands in graph order."""
        return self._position[id(node)]

    @property
    def shapes(self) -> dict[str, list]:
        """Value name -> dims (ints, symbolic names or None) from value_info, inputs and outputs."""
        if self._shapes is None:
            g = self.graph
            self._shapes = {}
            for v in (*g.value_info, *g.input, *g.output):
                if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                    self._shapes[v.name] = [d.dim_param if d.HasField("dim_param") else
                                            (d.dim_value if d.HasField("dim_value") else None)
                                            for d in v.type.tensor_type.shape.dim]
        return self._shapes

    # --- the pattern vocabulary ----------------------------------------------------------------
    def made_by(self, name: str, op_type: str, **attr_values) -> NodeProto | None:
        """The node that computes ``name`` if it is a standard ``op_type`` whose attributes equal
        ``attr_values``, else None."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type or node.domain not in STANDARD_DOMAINS:
            return None
        values = attrs(node) if attr_values else {}
        return node if all(values.get(k) == v for k, v in attr_values.items()) else None

    def private(self, name: str) -> bool:
        """``name`` is read by exactly one node and is no graph output."""
        return name not in self.outputs and len(self.readers.get(name, [])) == 1

    def uses(self, name: str) -> int:
        """How many node inputs (subgraphs too) and graph outputs read ``name``."""
        return len(self.readers.get(name, [])) + (name in self.outputs)

    def only_reader(self, name: str, op_type: str) -> NodeProto | None:
        """The one node reading ``name`` (a standard ``op_type``), or None if ``name`` has other
        readers or is a graph output."""
        if not self.private(name):
            return None
        node = self.readers[name][0]
        return node if node.op_type == op_type and node.domain in STANDARD_DOMAINS else None

    def private_made_by(self, name: str, op_type: str, **attr_values) -> NodeProto | None:
        """:meth:`made_by`, where nothing but one node reads ``name``."""
        return self.made_by(name, op_type, **attr_values) if self.private(name) else None

    def operand(self, node: NodeProto | None, op_type: str) -> tuple[NodeProto | None, str | None]:
        """(the node that makes one input of the two-input ``node``, a private ``op_type``; the
        other input), or (None, None)."""
        if node is None or len(node.input) != 2:
            return None, None
        for j, name in enumerate(node.input):
            inner = self.private_made_by(name, op_type)
            if inner is not None:
                return inner, node.input[1 - j]
        return None, None

    def const(self, name: str, dtype=np.float32) -> np.ndarray | None:
        """The value of initializer ``name`` if it is one of ``dtype`` that no graph input feeds."""
        t = self.inits.get(name)
        if t is None or name in self.fed:
            return None
        a = numpy_helper.to_array(t)
        return a if a.dtype == dtype else None

    @staticmethod
    def other_input(node: NodeProto, name: str) -> str:
        """The input of a two-input node that is not ``name``."""
        a, b = node.input
        return b if a == name else a


class Edit:
    """Replacements and initializer changes for the graph of ``index``, applied at once."""

    def __init__(self, index: GraphIndex):
        self.index = index
        self._at: dict[int, list[NodeProto]] = {}  # position -> the nodes that go there
        self._removed: set[int] = set()  # positions
        self._new_inits: list[TensorProto] = []
        self._dropped_inits: set[str] = set()

    def replace(self, nodes: Sequence[NodeProto], new_nodes: Sequence[NodeProto],
                at: NodeProto | None = None) -> bool:
        """Remove ``nodes`` (of the index's graph) and put ``new_nodes`` where ``at`` stands (by
        default the last of ``nodes`` in graph order: every reader of their outputs comes after).
        A node may stay by being one of ``new_nodes``. Returns False, changing nothing, where one
        of ``nodes`` is already part of an earlier replacement."""
        positions = {self.index.position(n) for n in nodes}
        if positions & self._removed:
            return False
        self._removed |= positions
        self._at[self.index.position(at) if at is not None else max(positions)] = list(new_nodes)
        return True

    @property
    def changed(self) -> int:
        """How many replacements are recorded."""
        return len(self._at)

    def add_initializer(self, tensor: TensorProto) -> None:
        self._new_inits.append(tensor)
        self.index.inits[tensor.name] = tensor

    def drop_initializers(self, names: Iterable[str]) -> None:
        self._dropped_inits.update(names)

    def apply(self) -> None:
        """Rebuild the graph's node list (and initializers, if changed) once, order kept."""
        graph = self.index.graph
        if self._removed:
            kept = []
            for j, node in enumerate(self.index.nodes):
                if j in self._at:
                    kept.extend(self._at[j])
                elif j not in self._removed:
                    kept.append(node)
            del graph.node[:]
            graph.node.extend(kept)
        delete_initializers(graph, lambda t: t.name in self._dropped_inits)
        graph.initializer.extend(self._new_inits)


@dataclass(frozen=True)
class Rule:
    """One rewrite: ``match(index, node)`` is the pattern and its check, anchored at ``node``
    (None: it does not apply there); ``rewrite(edit, found)`` records the replacement."""

    name: str
    match: Callable[[GraphIndex, NodeProto], Any]
    rewrite: Callable[[Edit, Any], Any]


def apply_rules(graph: GraphProto, rules: Sequence[Rule]) -> dict[str, int]:
    """Every rule at every node of ``graph`` (the first rule that matches a node wins; a match
    overlapping an earlier replacement is skipped). Returns how often each rule applied."""
    index = GraphIndex(graph)
    edit = Edit(index)
    counts = dict.fromkeys((r.name for r in rules), 0)
    for node in index.nodes:
        for rule in rules:
            found = rule.match(index, node)
            if found is not None and rule.rewrite(edit, found) is not False:
                counts[rule.name] += 1
                break
    edit.apply()
    return counts


def drop_dead_nodes(graph: GraphProto) -> None:
    """Remove nodes of ``graph`` whose outputs nothing reads, and initializers nothing reads."""
    while True:
        read = {x for node in all_nodes(graph) for x in node.input} | {o.name for o in graph.output}
        dead = [j for j, n in enumerate(graph.node) if not any(o in read for o in n.output if o)]
        if not dead:
            break
        for j in reversed(dead):
            del graph.node[j]
    read = {x for node in all_nodes(graph) for x in node.input}
    delete_initializers(graph, lambda t: t.name not in read)


def delete_initializers(graph: GraphProto, dead: Callable[[TensorProto], bool]) -> None:
    """Delete the initializers ``dead`` picks, in place: the others are not copied (a rebuilt
    list would copy every weight, ~1.5 s for 600 MB)."""
    for j in reversed([j for j, t in enumerate(graph.initializer) if dead(t)]):
        del graph.initializer[j]
