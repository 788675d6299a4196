"""The roofline puts each row under the peak of the arithmetic its products ran in."""

from __future__ import annotations

import pandas as pd

from reports import figures


def _rows(allow_tf32: list) -> pd.DataFrame:
    n = len(allow_tf32)
    return pd.DataFrame({
        "impl": ["cupy_implicit_gemm"] * n, "dtype": ["float32"] * (n - 1) + ["bfloat16"],
        "direction": ["forward"] * n, "tflops": [50.0] * n, "flops": [1e11] * n,
        "bytes": [1e7] * n, "hover": ["case"] * n, "params.allow_tf32": allow_tf32,
    })


def test_a_tf32_case_gets_the_tf32_roof_and_its_own_series():
    # The bfloat16 row's flag is missing (the column comes from another op's rows).
    figure = figures.roofline(_rows([False, True, None]), 4000.0, "NVIDIA H200", {
        "cupy_implicit_gemm": "#000"})
    names = [trace["name"] for trace in figure["data"]]
    assert {"cupy_implicit_gemm · float32", "cupy_implicit_gemm · tf32",
            "cupy_implicit_gemm · bfloat16"} <= set(names)
    roofs = {trace["name"]: max(trace["y"]) for trace in figure["data"]
             if trace["name"].startswith("roof")}
    assert roofs == {"roof: 4000 GB/s, 67 TFLOP/s float32": 67.0,
                     "roof: 4000 GB/s, 494.7 TFLOP/s tf32": 494.7,
                     "roof: 4000 GB/s, 989.5 TFLOP/s bfloat16": 989.5}


def test_rows_without_the_parameter_keep_their_dtype():
    rows = _rows([False, False, False]).drop(columns="params.allow_tf32")
    assert figures.precision(rows).tolist() == ["float32", "float32", "bfloat16"]
