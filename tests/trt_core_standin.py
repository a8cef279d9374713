"""A stand-in for TensorRT's compiled core (`tensorrt.tensorrt`), just enough for the real pure-Python
`tensorrt.plugin` package of the bindings wheel to run on CPU, the way the ONNX parser and the builder
drive a plugin: plugin registry, plugin fields, data types and formats, tensor descriptors, and symbolic
dimension expressions (IExprBuilder / IDimensionExpr) that can be evaluated afterwards with numbers.

The conformance test copies this file to <tmp>/tensorrt/__init__.py beside the wheel's plugin/ folder; the
names used here are the compiled module's (checked against its strings by the same test).
"""

import enum

import numpy as np

__version__ = "0.0.0"  # the test writes the wheel's version here


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10
    E8M0 = 11


float32, float16, int8, int32, uint8, bfloat16, int64 = (DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32,
                                                       DataType.UINT8, DataType.BF16, DataType.INT64)
_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}


def nptype(dtype):
    return _NP[dtype]


class TensorFormat(enum.IntEnum):
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5
    DHWC8 = 6
    CDHW32 = 7
    HWC = 8
    DLA_LINEAR = 9
    DLA_HWC4 = 10
    HWC16 = 11
    DHWC = 12


class PluginFieldType(enum.IntEnum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


class DimensionOperation(enum.IntEnum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


class TensorRTPhase(enum.IntEnum):
    BUILD = 0
    RUNTIME = 1


class QuickPluginCreationRequest(enum.IntEnum):
    UNKNOWN = 0
    PREFER_JIT = 1
    PREFER_AOT = 2
    STRICT_JIT = 3
    STRICT_AOT = 4


class PluginArgType(enum.IntEnum):
    INT = 0


class PluginArgDataType(enum.IntEnum):
    INT8 = 0
    INT16 = 1
    INT32 = 2


class PluginCapabilityType(enum.IntEnum):
    CORE = 0
    BUILD = 1
    RUNTIME = 2


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, severity=WARNING):
        self.severity = severity

    def log(self, severity, message):
        pass


class PluginField:
    def __init__(self, name="", data=None, type=PluginFieldType.UNKNOWN):
        self.name, self.type = name, type
        self.data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)
        self.size = self.data.size


class PluginFieldCollection(list):
    pass


class Dims(tuple):
    MAX_DIMS = 8


class DimsExprs(list):
    def __init__(self, n=0):
        super().__init__([None] * n)


class PluginTensorDesc:
    def __init__(self):
        self.type, self.format, self.dims, self.scale = DataType.FLOAT, TensorFormat.LINEAR, Dims(), 1.0


class DynamicPluginTensorDesc:
    def __init__(self, desc=None, min=None, max=None, opt=None):
        self.desc, self.min, self.max, self.opt = desc or PluginTensorDesc(), min, max, opt


class ITensor:
    pass


class IDimensionExpr:
    """A constant, a named symbol, or an operation on two expressions; `evaluate({symbol: value})`."""

    def __init__(self, value=None, symbol=None, op=None, args=()):
        self.value, self.symbol, self.op, self.args = value, symbol, op, args

    def is_constant(self):
        return self.value is not None

    def get_constant_value(self):
        return self.value

    def is_size_tensor(self):
        return False

    def evaluate(self, env):
        if self.value is not None:
            return self.value
        if self.symbol is not None:
            return env[self.symbol]
        a, b = (x.evaluate(env) for x in self.args)
        return {DimensionOperation.SUM: a + b, DimensionOperation.PROD: a * b, DimensionOperation.MAX: max(a, b),
                DimensionOperation.MIN: min(a, b), DimensionOperation.SUB: a - b, DimensionOperation.EQUAL: int(a == b),
                DimensionOperation.LESS: int(a < b), DimensionOperation.FLOOR_DIV: a // b,
                DimensionOperation.CEIL_DIV: -(-a // b)}[self.op]


class IExprBuilder:
    def constant(self, value):
        return IDimensionExpr(value=int(value))

    def operation(self, op, first, second):
        return IDimensionExpr(op=op, args=(first, second))


class ISymExpr:
    def __init__(self):
        pass


class _Interface:
    def __init__(self):
        pass


class IPluginV3(_Interface):
    pass


class IPluginV3QuickCore(_Interface):
    pass


class IPluginV3QuickBuild(_Interface):
    pass


class IPluginV3QuickRuntime(_Interface):
    pass


class IPluginV3QuickAOTBuild(_Interface):
    pass


class IPluginCreatorV3Quick(_Interface):
    pass


class _Registry:
    def __init__(self):
        self.creators = {}

    def register_creator(self, creator, namespace):
        self.creators[(creator.name, creator.plugin_version, namespace)] = creator
        return True

    def get_creator(self, name, version, namespace=""):
        return self.creators.get((name, version, namespace))


_REGISTRY = _Registry()


def get_plugin_registry():
    return _REGISTRY
