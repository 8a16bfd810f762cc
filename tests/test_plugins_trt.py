"""The TensorRT plugin definitions (plugins/tensorrt_plugins.py) on CPU, through a stand-in for
``tensorrt.plugin``: TensorRT's builder cannot be installed here, so without it the module would only
ever be imported on a GPU machine.

The stand-in follows tensorrt.plugin's documented schemas and its pure-Python layer
(``tensorrt/plugin/_validate.py``, ``_lib.py``, ``_plugin_class.py`` of the tensorrt bindings wheels
10.9 to 11.4): register takes the input TensorDescs then the attributes (annotated, no defaults);
autotune takes the inputs, a subset of the attributes and ``outputs``; aot_impl the inputs, a
subset of the attributes, ``outputs`` and ``tactic``, and returns (kernel name, PTX,
KernelLaunchParams, SymIntExprs of SymInt32). The plugin creator builds each attribute from the
plugin field the ONNX parser passes: onnx-tensorrt's ``loadFields`` turns an ONNX INT / FLOAT
attribute into a length-1 kINT32 / kFLOAT32 field, whose ``data`` is a length-1 numpy array, and
TensorRT 10.9 to 11.1 build a numpy-annotated attribute as ``data.astype(dtype)`` and any other as
``annotation(data)`` (``_TemplatePluginCreator.create_plugin``), which NumPy >= 2.4 refuses for a
length-1 array.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
import typing
import warnings

import numpy as np
import pytest

from xlstm_export import contract
from xlstm_export.plugins import build, device, launch

PLUGIN_MODULE = "xlstm_export.plugins.tensorrt_plugins"


class _Expr:
    """ShapeExpr / SymInt32 stand-in: an int or a symbol name; + - * // with the expression on the left."""

    is_fake = False

    def __init__(self, value=None):
        self.value = value.value if isinstance(value, _Expr) else value

    @property
    def is_constant(self) -> bool:
        return isinstance(self.value, int)

    def constant_value(self) -> int:
        assert self.is_constant, f"{self.value} is not a constant"
        return self.value

    def _op(self, other, sign, fn):
        b = other.value if isinstance(other, _Expr) else other
        if isinstance(self.value, int) and isinstance(b, int):
            return type(self)(fn(self.value, b))
        return type(self)(f"({self.value} {sign} {b})")

    def __add__(self, other):
        return self._op(other, "+", lambda a, b: a + b)

    def __sub__(self, other):
        return self._op(other, "-", lambda a, b: a - b)

    def __mul__(self, other):
        return self._op(other, "*", lambda a, b: a * b)

    def __floordiv__(self, other):
        return self._op(other, "//", lambda a, b: a // b)


def _fake_tensorrt():
    """(tensorrt, tensorrt.plugin) stand-ins; the plugin module records what is registered."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "stand-in"
    trt.float32, trt.float16, trt.bfloat16 = "DataType.FLOAT", "DataType.HALF", "DataType.BF16"
    trtp = types.ModuleType("tensorrt.plugin")
    trt.plugin = trtp
    trtp.registry = {}

    class SymInt32(_Expr):
        pass

    class ShapeExpr(SymInt32):
        pass

    class TensorDesc:
        def __init__(self, shape_expr=(), dtype=None):
            self.shape_expr, self.dtype = tuple(ShapeExpr(d) for d in shape_expr), dtype

        @property
        def ndim(self) -> int:
            return len(self.shape_expr)

    class KernelLaunchParams:
        FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

        def __init__(self):
            for name in self.FIELDS:
                setattr(self, name, 0 if name == "shared_mem" else 1)

        def __setattr__(self, name, value):
            if name not in self.FIELDS:
                raise AttributeError(f"KernelLaunchParams object has no attribute '{name}'")
            self.__dict__[name] = SymInt32(value)

    class SymIntExprs(tuple):
        @classmethod
        def from_tuple(cls, exprs):
            return cls(e if isinstance(e, SymInt32) else SymInt32(e) for e in exprs)

    class AutoTuneCombination:
        def __init__(self, io_types: str, layouts: str = "LINEAR"):
            self.io_types = [t.strip() for t in io_types.split(",")]
            self.layouts = [x.strip() for x in layouts.split(",")]

    def from_shape_expr(shape_expr, dtype):
        return TensorDesc(shape_expr, dtype)

    def _is_numpy_attr(annotation) -> bool:
        return typing.get_origin(annotation) is np.ndarray

    def register(plugin_id):
        ns, name = plugin_id.split("::")
        assert ns and name and "." not in plugin_id, plugin_id

        def deco(fn):
            tensors, attrs = [], {}
            for pname, p in inspect.signature(fn).parameters.items():
                assert p.annotation is not inspect.Parameter.empty, f"{pname}: no annotation"
                assert p.default is inspect.Parameter.empty, f"{pname}: default values are not supported"
                if p.annotation is TensorDesc:
                    assert not attrs, "TensorDescs and attributes cannot be interspersed"
                    tensors.append(pname)
                else:
                    assert tensors and pname not in ("outputs", "stream", "tactic"), pname
                    assert p.annotation in (int, float, bool, str, bytes) or _is_numpy_attr(p.annotation), pname
                    attrs[pname] = p.annotation
            ret = inspect.signature(fn).return_annotation
            assert typing.get_origin(ret) is tuple and all(a is TensorDesc for a in typing.get_args(ret)), ret
            trtp.registry[plugin_id] = {"register": fn, "tensors": tensors, "attrs": attrs,
                                        "num_outputs": len(typing.get_args(ret))}
            return fn

        return deco

    def _check_schema(plugin_id, fn, tail):
        d = trtp.registry[plugin_id]
        params = inspect.signature(fn).parameters
        used = [n for n in params if n in d["attrs"]]
        for n in used:
            assert params[n].annotation == d["attrs"][n], f"{n}: annotation differs from register's"
        expected = [*d["tensors"], *(n for n in d["attrs"] if n in used), *tail]
        assert list(params) == expected, f"{fn.__name__}{list(params)} does not match the schema {expected}"
        return used

    def autotune(plugin_id):
        def deco(fn):
            trtp.registry[plugin_id]["autotune_attrs"] = _check_schema(plugin_id, fn, ["outputs"])
            trtp.registry[plugin_id]["autotune"] = fn
            return fn

        return deco

    def aot_impl(plugin_id):
        def deco(fn):
            _check_schema(plugin_id, fn, ["outputs", "tactic"])
            trtp.registry[plugin_id]["aot_impl"] = fn
            return fn

        return deco

    def create_attrs(plugin_id, fields):
        """Attributes from the ONNX parser's fields, built as TensorRT 10.9 to 11.1 build them."""
        attrs = {}
        for name, data in fields.items():
            annotation = trtp.registry[plugin_id]["attrs"][name]
            if _is_numpy_attr(annotation):
                attrs[name] = data.astype(typing.get_args(typing.get_args(annotation)[1])[0])
            else:
                attrs[name] = annotation(data)
        return attrs

    for obj in (SymInt32, ShapeExpr, TensorDesc, KernelLaunchParams, SymIntExprs, AutoTuneCombination,
                from_shape_expr, register, autotune, aot_impl, create_attrs):
        setattr(trtp, obj.__name__, obj)
    return trt, trtp


@pytest.fixture
def trt_plugins(monkeypatch):
    """(tensorrt_plugins imported against the stand-in, the stand-in tensorrt.plugin)."""
    trt, trtp = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE, raising=False)
    monkeypatch.setattr(build, "ptx", lambda op, arch: f"// PTX of {op} for {arch}")  # no nvcc needed
    try:
        yield importlib.import_module(PLUGIN_MODULE), trtp
    finally:
        sys.modules.pop(PLUGIN_MODULE, None)  # later imports see the real tensorrt (or its absence)


def _descs(trtp, shapes: dict, dtypes: dict):
    return [trtp.TensorDesc(shapes[n], dtypes[n]) for n in shapes]


def test_plugins_register_with_the_documented_schemas(trt_plugins):
    _, trtp = trt_plugins
    reg = trtp.registry
    assert sorted(reg) == ["xlstm::mLSTM", "xlstm::sLSTM"]  # the ONNX parser's (op type, plugin_namespace)
    for spec in (contract.MLSTM, contract.SLSTM):
        d = reg[spec.qualname]
        assert d["tensors"] == contract.input_names(spec) and d["num_outputs"] == len(spec.outputs)
        assert {"register", "autotune", "aot_impl"} <= set(d)
    assert list(reg["xlstm::mLSTM"]["attrs"]) == ["chunk_size", "eps"] and reg["xlstm::sLSTM"]["attrs"] == {}


@pytest.mark.parametrize("dtype", contract.T_DTYPES)
def test_mlstm_plugin_from_the_attributes_the_onnx_parser_passes(trt_plugins, dtype):
    """chunk_size and eps arrive as length-1 int32 / float32 arrays; building the attributes must
    neither fail nor warn (int(length-1 array) is a TypeError in NumPy >= 2.4, deprecated since
    1.25), and register / autotune / aot_impl then give the contract's outputs and launch."""
    _, trtp = trt_plugins
    fields = {"chunk_size": np.array([64], np.int32), "eps": np.array([1e-6], np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attrs = trtp.create_attrs("xlstm::mLSTM", fields)
    NH, DQK, DV = 4, 256, 512
    T = {"float32": "DataType.FLOAT", "float16": "DataType.HALF", "bfloat16": "DataType.BF16"}[dtype]
    shapes = {"q": ("B", NH, "S", DQK), "k": ("B", NH, "S", DQK), "v": ("B", NH, "S", DV), "i": ("B", NH, "S"),
              "f": ("B", NH, "S"), "c0": ("B", NH, DQK, DV), "n0": ("B", NH, DQK), "m0": ("B", NH)}
    dtypes = {n: T if n in "qkvif" else "DataType.FLOAT" for n in shapes}
    reg = trtp.registry["xlstm::mLSTM"]
    inputs = _descs(trtp, shapes, dtypes)
    outputs = reg["register"](*inputs, **attrs)
    assert [o.dtype for o in outputs] == [T] + ["DataType.FLOAT"] * 3
    assert [tuple(e.value for e in o.shape_expr) for o in outputs] == [
        ("B", NH, "S", DV), ("B", NH, DQK, DV), ("B", NH, DQK), ("B", NH)]
    (combo,) = reg["autotune"](*inputs, outputs)
    assert len(combo.io_types) == len(shapes) + len(outputs) and combo.layouts == ["LINEAR"]
    # TensorRT passes every attribute positionally, in register order (get_launch_params)
    name, ptx, lp, extra = reg["aot_impl"](*inputs, *attrs.values(), outputs, 0)
    assert name == build.kernel_name("mLSTM", dtype) and ptx.startswith("// PTX of mLSTM")
    want = launch.mlstm_launch(2, NH, 3, DQK, DV, chunk_size=64, eps=1e-6)
    assert (lp.grid_x.value, lp.grid_y.value, lp.grid_z.value) == (want.grid[0], NH, "B")
    assert (lp.block_x.value, lp.block_y.value, lp.block_z.value) == want.block
    assert lp.shared_mem.value == want.shared_mem <= device.smem_optin_bytes()
    assert all(isinstance(a, trtp.SymInt32) for a in extra)
    assert [a.value for a in extra] == ["B", NH, "S", DQK, DV, 64, launch.float_bits(1e-6)]


def test_slstm_plugin_launch_is_symbolic_in_batch_and_sequence(trt_plugins):
    _, trtp = trt_plugins
    NH, DH = 4, 128
    shapes = {"x": ("B", NH, "S", 4 * DH), "r": (NH, DH, 4 * DH), "b": (NH, 4 * DH), "h0": ("B", NH, DH),
              "c0": ("B", NH, DH), "n0": ("B", NH, DH), "m0": ("B", NH, DH)}
    dtypes = {n: "DataType.BF16" if n in ("x", "r", "b") else "DataType.FLOAT" for n in shapes}
    reg = trtp.registry["xlstm::sLSTM"]
    inputs = _descs(trtp, shapes, dtypes)
    outputs = reg["register"](*inputs)
    assert [o.dtype for o in outputs] == ["DataType.BF16"] + ["DataType.FLOAT"] * 4
    name, _, lp, extra = reg["aot_impl"](*inputs, outputs, 0)
    want = launch.slstm_launch(2, NH, 3, DH, itemsize=2, smem_limit=device.smem_optin_bytes())
    assert name == build.kernel_name("sLSTM", "bfloat16")
    assert (lp.grid_x.value, lp.grid_y.value, lp.grid_z.value) == (NH, "B", 1)
    assert (lp.block_x.value, lp.shared_mem.value) == (want.block[0], want.shared_mem)
    assert [a.value for a in extra] == ["B", NH, "S", DH, want.extra_args[-1]]


def test_bad_mlstm_attribute_is_one_error_naming_the_op(trt_plugins):
    _, trtp = trt_plugins
    attrs = trtp.create_attrs("xlstm::mLSTM", {"chunk_size": np.array([0], np.int32),
                                               "eps": np.array([1e-6], np.float32)})
    shapes = {"q": ("B", 1, "S", 16), "k": ("B", 1, "S", 16), "v": ("B", 1, "S", 16), "i": ("B", 1, "S"),
              "f": ("B", 1, "S"), "c0": ("B", 1, 16, 16), "n0": ("B", 1, 16), "m0": ("B", 1)}
    inputs = _descs(trtp, shapes, dict.fromkeys(shapes, "DataType.FLOAT"))
    with pytest.raises(ValueError, match=r"xlstm::mLSTM.*chunk_size"):
        trtp.registry["xlstm::mLSTM"]["register"](*inputs, **attrs)
    with pytest.raises(ValueError, match=r"xlstm::mLSTM: attribute eps must be one value"):
        trtp.registry["xlstm::mLSTM"]["register"](*inputs, chunk_size=np.array([64], np.int32),
                                                  eps=np.array([1e-6, 1e-6], np.float32))
