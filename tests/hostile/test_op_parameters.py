"""Bad values for every scalar parameter of every public op, generated from
the functions' signatures (a new op needs only its valid tensors in VALID):
each is refused with an error naming the parameter, and a number given as a
NumPy scalar or a 0-d tensor means what the Python number means."""

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


GOOD = []
for _op in VALID:
    _defaults = {p.name: p.default for p in inspect.signature(OPS[_op]).parameters.values()}
    _keywords = VALID[_op]()[1]
    for _param, _ in _scalar_parameters(_op):
        value = _keywords.get(_param, _defaults[_param])
        if isinstance(value, (bool, int, float)) and _param != "design":
            GOOD += [(_op, _param, v) for v in _same_number_other_types(value)]


@pytest.mark.parametrize(("op", "param", "value"), GOOD,
                         ids=[f"{o}-{p}-{type(v).__name__}" for o, p, v in GOOD])
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
