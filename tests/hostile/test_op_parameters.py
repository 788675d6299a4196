"""Bad values for every scalar parameter of every public op function and
module, generated from their signatures (a new op needs only its valid
arguments in VALID, a new module in VALID_MODULES): each is refused with an
error naming the parameter, and a number given as a NumPy scalar or a 0-d
tensor, alone or in an (h, w) pair, means what the Python number means."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import numpy as np
import pytest
import torch

import kernels.ops


def _rois():
    return torch.tensor([[0.0, 1.0, 1.0, 6.0, 6.0]])


def _seeded(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))


# Valid arguments of each public op: its tensors, and the keywords without defaults.
VALID = {
    "deform_conv2d": lambda: ((_seeded(1, 2, 4, 4), _seeded(1, 18, 2, 2), _seeded(2, 2, 3, 3)), {}),
    "modulated_deform_conv2d": lambda: ((_seeded(1, 2, 4, 4), _seeded(1, 18, 2, 2),
                                         _seeded(1, 9, 2, 2).sigmoid(), _seeded(2, 2, 3, 3)), {}),
    "dcnv3": lambda: ((_seeded(1, 4, 4, 4), _seeded(1, 4, 4, 18), _seeded(1, 4, 4, 9)),
                      {"group": 1, "group_channels": 4}),
    "dcnv4": lambda: ((_seeded(1, 4, 4, 4), _seeded(1, 4, 4, 32)),
                      {"group": 1, "group_channels": 4}),
    "deform_roi_pool": lambda: ((_seeded(1, 2, 8, 8), _rois(), _seeded(1, 2, 2, 2)),
                                {"output_size": 2}),
    "modulated_deform_roi_pool": lambda: ((_seeded(1, 2, 8, 8), _rois(), _seeded(1, 2, 2, 2),
                                           _seeded(1, 1, 2, 2).sigmoid()), {"output_size": 2}),
    "roi_align": lambda: ((_seeded(1, 2, 8, 8), _rois()), {"output_size": 2}),
    "deform_psroi_pool": lambda: ((_seeded(1, 2, 8, 8), _rois(), _seeded(1, 2, 2, 2)),
                                  {"output_dim": 2, "pooled_size": 2}),
    # One 3x4 level, 2 queries, 1 head of 4 channels, 2 points.
    "ms_deform_attn": lambda: ((_seeded(1, 12, 1, 4), torch.tensor([[3, 4]]), torch.tensor([0]),
                                _seeded(1, 2, 1, 1, 2, 2).sigmoid(),
                                _seeded(1, 2, 1, 1, 2).softmax(-1)), {}),
}


def _public_ops():
    ops = {}
    for module in pkgutil.iter_modules(kernels.ops.__path__):
        loaded = importlib.import_module(f"kernels.ops.{module.name}")
        for name in getattr(loaded, "__all__", ()):
            function = getattr(loaded, name)
            if inspect.isfunction(function) and name not in ("prepare", "unchecked_dcnv3"):
                ops[name] = function
    return ops


OPS = _public_ops()
BAD = {"int": ["1", 1.5, True, float("nan"), object()],
       "float": ["1", True, float("nan"), float("inf"), None, object()],
       "bool": ["yes", None, 1, 0.0]}


def _scalar_parameters(name):
    """(parameter, kind) for each parameter annotated int, float or bool."""
    for parameter in inspect.signature(OPS[name]).parameters.values():
        annotation = str(parameter.annotation)
        for kind in ("bool", "float", "int"):
            if annotation.split(" | ")[0] == kind or annotation.startswith(f"{kind} | tuple"):
                yield parameter.name, kind
                break


def test_every_public_op_has_valid_arguments_here():
    assert set(OPS) == set(VALID)


CASES = [(op, param, kind, bad) for op in VALID for param, kind in _scalar_parameters(op)
         for bad in BAD[kind]]


@pytest.mark.parametrize(("op", "param", "kind", "bad"), CASES,
                         ids=[f"{o}-{p}-{b!r}"[:60] for o, p, _, b in CASES])
def test_a_bad_value_is_refused_naming_the_parameter(op, param, kind, bad):
    tensors, keywords = VALID[op]()
    with pytest.raises((TypeError, ValueError), match=param):
        OPS[op](*tensors, **{**keywords, param: bad})


def _same_number_other_types(value):
    if isinstance(value, bool):
        return [np.bool_(value), torch.tensor(value)]
    if isinstance(value, int):
        return [np.int64(value), np.int32(value), torch.tensor(value)]
    return [np.float64(value), torch.tensor(value, dtype=torch.float64)]


def _pair_other_types(pair):
    """An (h, w) pair of ints as a pair of NumPy scalars, of 0-d tensors, a list of them."""
    h, w = pair
    return [(np.int64(h), np.int64(w)), (torch.tensor(h), torch.tensor(w)), [np.int32(h), w]]


GOOD = []
for _op in VALID:
    _signature = inspect.signature(OPS[_op]).parameters
    _keywords = VALID[_op]()[1]
    for _param, _ in _scalar_parameters(_op):
        value = _keywords.get(_param, _signature[_param].default)
        pairs = "tuple" in str(_signature[_param].annotation)
        if isinstance(value, (bool, int, float)) and _param != "design":
            GOOD += [(_op, _param, v) for v in _same_number_other_types(value)]
            if pairs:
                GOOD += [(_op, _param, v) for v in _pair_other_types((value, value))]
        elif pairs and isinstance(value, tuple):
            GOOD += [(_op, _param, v) for v in _pair_other_types(value)]


@pytest.mark.parametrize(("op", "param", "value"), GOOD,
                         ids=[f"{o}-{p}-{v!r}"[:60] for o, p, v in GOOD])
def test_numpy_and_0d_tensor_numbers_mean_the_python_number(op, param, value):
    tensors, keywords = VALID[op]()
    expected = OPS[op](*tensors, **keywords)
    got = OPS[op](*tensors, **{**keywords, param: value})
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: kernels.ops.deform_conv2d.DeformConv2d(4, 4, 0), "kernel_size must be >= 1"),
    (lambda: kernels.ops.deform_conv2d.DeformConv2d(4, 4, 3, groups=0), "groups must be an int >= 1"),
    (lambda: kernels.ops.deform_conv2d.DeformConv2d(4, 4, 3, stride=1.5),
     "stride must be an int or a pair of ints, got 1.5"),
    (lambda: kernels.ops.dcnv3_layer.DCNv3Layer(8, 0), "group must be an int >= 1, got 0"),
    (lambda: kernels.ops.dcnv3_layer.DCNv3Layer(8, 2.0), "group must be an int, got 2.0"),
])
def test_layers_refuse_bad_sizes_naming_them(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


def test_layers_take_numpy_sizes():
    layer = kernels.ops.deform_conv2d.DeformConv2d(np.int64(4), np.int64(4), np.int64(3))
    assert layer.weight.shape == (4, 4, 3, 3) and type(layer.in_channels) is int


# --- the same numbers in every public module's constructor ---------------------

def _module_classes():
    classes = {}
    for module in pkgutil.iter_modules(kernels.ops.__path__):
        loaded = importlib.import_module(f"kernels.ops.{module.name}")
        for name, value in vars(loaded).items():
            if (inspect.isclass(value) and issubclass(value, torch.nn.Module)
                    and value.__module__ == loaded.__name__ and not name.startswith("_")):
                classes[name] = value
    return classes


MODULES = _module_classes()


def _conv_input(mask):
    tensors = (_seeded(1, 2, 4, 4), _seeded(1, 18, 4, 4))
    return (*tensors, _seeded(1, 9, 4, 4).sigmoid()) if mask else tensors


def _roi_input(*extra):
    return (_seeded(1, 2, 8, 8), _rois(), *(_seeded(*shape) for shape in extra))


def _msda_input():
    # One 3x4 level, 2 queries, d_model 8.
    return (_seeded(1, 2, 8), _seeded(1, 2, 1, 2).sigmoid(), _seeded(1, 12, 8),
            torch.tensor([[3, 4]]), torch.tensor([0]))


# Each public module: valid constructor arguments (positional, keywords) and forward inputs.
VALID_MODULES = {
    "DeformConv2d": ((2, 2, 3), {"padding": 1}, lambda: _conv_input(mask=False)),
    "ModulatedDeformConv2d": ((2, 2, 3), {"padding": 1}, lambda: _conv_input(mask=True)),
    "DCNv3Layer": ((8, 2), {}, lambda: (_seeded(1, 4, 4, 8),)),
    "MSDeformAttn": ((), {"d_model": 8, "n_levels": 1, "n_heads": 2, "n_points": 2}, _msda_input),
    "RoIAlign": ((2,), {}, _roi_input),
    "DeformRoIPool": ((2,), {}, lambda: _roi_input((1, 2, 2, 2))),
    "ModulatedDeformRoIPool": ((2,), {}, lambda: _roi_input((1, 2, 2, 2), (1, 1, 2, 2))),
    "DeformRoIPoolPack": ((2, 2), {"deform_fc_channels": 4}, _roi_input),
    "ModulatedDeformRoIPoolPack": ((2, 2), {"deform_fc_channels": 4}, _roi_input),
    "DeformPSRoIPool": ((1.0, 2, 2), {"trans_std": 0.1}, lambda: _roi_input((1, 2, 2, 2))),
    "DeformPSRoIPoolPack": ((1.0, 2, 2), {"trans_std": 0.1, "deform_fc_channels": 4}, _roi_input),
}


def test_every_public_module_has_valid_arguments_here():
    assert set(MODULES) == set(VALID_MODULES)


def _numbers(function, positional=(), keywords=None):
    """(parameter, value) for each int, float or bool parameter of ``function`` that
    the call (``positional`` and ``keywords``, else the defaults) gives a number."""
    keywords = keywords or {}
    parameters = [p for p in inspect.signature(function).parameters.values() if p.name != "self"]
    for index, parameter in enumerate(parameters):
        kind = str(parameter.annotation).split(" | ")[0]
        if kind not in ("int", "float", "bool"):
            continue
        if index < len(positional):
            value = positional[index]
        else:
            value = keywords.get(parameter.name, parameter.default)
        if isinstance(value, (bool, int, float)):
            yield parameter.name, value


def _other_types(value, pairs):
    """``value`` as NumPy scalars and 0-d tensors; with ``pairs``, also as pairs of them."""
    others = _same_number_other_types(value)
    return others + _pair_other_types((value, value)) if pairs else others


def _pairs_allowed(function, name):
    return "tuple" in str(inspect.signature(function).parameters[name].annotation)


MODULE_CASES = [(cls, name, other) for cls, (positional, keywords, _) in VALID_MODULES.items()
                for name, value in _numbers(MODULES[cls].__init__, positional, keywords)
                for other in _other_types(value, _pairs_allowed(MODULES[cls].__init__, name))]


def _construct(cls, positional, keywords, name=None, value=None):
    """``cls`` built from a fresh seed (so two builds start from the same weights),
    with ``name`` set to ``value`` wherever the call names it."""
    parameters = [p for p in inspect.signature(MODULES[cls].__init__).parameters if p != "self"]
    positional, keywords = list(positional), dict(keywords)
    if name is not None:
        index = parameters.index(name)
        if index < len(positional):
            positional[index] = value
        else:
            keywords[name] = value
    torch.manual_seed(0)
    return MODULES[cls](*positional, **keywords)


@pytest.mark.parametrize(("cls", "name", "value"), MODULE_CASES,
                         ids=[f"{c}-{n}-{v!r}"[:60] for c, n, v in MODULE_CASES])
def test_modules_take_numpy_and_0d_tensor_numbers(cls, name, value):
    positional, keywords, inputs = VALID_MODULES[cls]
    expected = _construct(cls, positional, keywords)(*inputs())
    got = _construct(cls, positional, keywords, name, value)(*inputs())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


BAD_MODULE_CASES = [(cls, name, bad) for cls, (positional, keywords, _) in VALID_MODULES.items()
                    for name, value in _numbers(MODULES[cls].__init__, positional, keywords)
                    for bad in BAD[type(value).__name__]]


@pytest.mark.parametrize(("cls", "name", "bad"), BAD_MODULE_CASES,
                         ids=[f"{c}-{n}-{b!r}"[:60] for c, n, b in BAD_MODULE_CASES])
def test_a_bad_module_argument_is_refused_naming_it(cls, name, bad):
    positional, keywords, inputs = VALID_MODULES[cls]
    with pytest.raises((TypeError, ValueError), match=name):
        _construct(cls, positional, keywords, name, bad)(*inputs())
