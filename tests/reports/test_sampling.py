"""The sampling view's geometry, checked against the contract's formulas written out here."""

import numpy as np
import pytest

from harness import casefile
from reports import figures, sampling

PARAMS = {"N": 1, "C_in": 4, "C_out": 4, "H": 9, "W": 11, "kernel_h": 3, "kernel_w": 3,
          "stride_h": 2, "stride_w": 1, "pad_h": 1, "pad_w": 2, "dilation_h": 1,
          "dilation_w": 2, "groups": 1, "offset_groups": 2, "bias": True}


@pytest.mark.parametrize("op", ["deform_conv2d", "modulated_deform_conv2d"])
def test_conv_sampling_follows_the_contract(op, tmp_path):
    path = sampling.save_case(op, PARAMS, "float32", "random", 0, tmp_path / "case.npz")
    picture = sampling.picture(path)
    params, arrays = casefile.load(path)
    offset = arrays["offset"]
    out_h, out_w = offset.shape[2:]
    ho, wo = out_h // 2, out_w // 2
    for k in range(9):
        i, j = divmod(k, 3)
        # docs/ops-semantics.md: y = ho·stride_h − pad_h + i·dilation_h + dy, with dy in
        # channel 2·(g·kh·kw + k) and dx in the next; group 0 here.
        y0, x0 = ho * 2 - 1 + i * 1, wo * 1 - 2 + j * 2
        assert picture.regular[k].tolist() == [y0, x0]
        assert picture.deformed[k] == pytest.approx(
            [y0 + offset[0, 2 * k, ho, wo], x0 + offset[0, 2 * k + 1, ho, wo]])
    if op == "modulated_deform_conv2d":
        assert picture.weight == pytest.approx(arrays["mask"][0, :9, ho, wo])
    else:
        assert picture.weight is None
    # The heat map is offset group 0's channels (C_in / offset_groups = 2) averaged.
    assert picture.heat == pytest.approx(arrays["input"][0, :2].mean(axis=0))
    assert params["case_id"] == picture.case_id
    figure = figures.sampling(picture)
    assert [t["name"] for t in figure["data"]] == ["input", "regular grid",
                                                   "deformed samples", "offset"]


def test_operator_without_adapter(tmp_path):
    path = tmp_path / "case.npz"
    np.savez(path, params=np.array('{"op": "conv2d"}'), input=np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="no sampling view for operator 'conv2d'"):
        sampling.picture(path)


DCN34 = {"N": 1, "H": 7, "W": 9, "group": 2, "group_channels": 4, "kernel_h": 3, "kernel_w": 3,
         "stride_h": 1, "stride_w": 2, "pad_h": 1, "pad_w": 1, "dilation_h": 2,
         "dilation_w": 1, "offset_scale": 0.5, "remove_center": False}


@pytest.mark.parametrize("op", ["dcnv3", "dcnv4"])
def test_dcnv3_dcnv4_sampling_follows_the_contract(op, tmp_path):
    params = {**DCN34, **({"softmax": False} if op == "dcnv3" else {})}
    path = sampling.save_case(op, params, "float32", "random", 0, tmp_path / "case.npz")
    picture = sampling.picture(path)
    _, arrays = casefile.load(path)
    if op == "dcnv3":
        offset, mask = arrays["offset"], arrays["mask"]
    else:  # offset_mask: group g's (dx, dy) of tap p at g·3P + 2p, its mask at g·3P + 2P + p
        offset, mask = arrays["offset_mask"][..., :18], arrays["offset_mask"][..., 18:27]
    out_h, out_w = offset.shape[1:3]
    ho, wo = out_h // 2, out_w // 2
    half_h, half_w = 2 * (3 - 1) // 2, 1 * (3 - 1) // 2
    for p in range(9):
        i, j = divmod(p, 3)  # column-major: i over kernel_w outer, j over kernel_h inner
        dx, dy = offset[0, ho, wo, 2 * p], offset[0, ho, wo, 2 * p + 1]  # group 0, x first
        x = wo * 2 - 1 + half_w + (i * 1 - half_w + dx) * 0.5
        y = ho * 1 - 1 + half_h + (j * 2 - half_h + dy) * 0.5
        assert picture.deformed[p] == pytest.approx([y, x])
        assert picture.regular[p] == pytest.approx([y - dy * 0.5, x - dx * 0.5])
        assert picture.weight[p] == pytest.approx(mask[0, ho, wo, p])
    assert picture.heat == pytest.approx(arrays["input"][0, :, :, :4].mean(axis=-1))


ROI = {"N": 2, "C": 3, "H": 12, "W": 14, "K": 3, "pooled_h": 3, "pooled_w": 5,
       "spatial_scale": 0.5, "sampling_ratio": 2, "gamma": 0.1}


@pytest.mark.parametrize("op", ["deform_roi_pool", "modulated_deform_roi_pool"])
def test_roi_pool_sampling_follows_the_contract(op, tmp_path):
    path = sampling.save_case(op, ROI, "float32", "random", 0, tmp_path / "case.npz")
    picture = sampling.picture(path)
    _, arrays = casefile.load(path)
    batch, x1, y1, x2, y2 = arrays["rois"][0].astype(np.float64)
    # docs/ops-semantics.md: start = x1·spatial_scale − 0.5, roi_w = end − start,
    # bin_w = roi_w / pooled_w; start_x += gamma·roi_w·offset[k, 0]; samples at
    # start + pw·bin_w + (ix + 0.5)·bin_w / grid_w (likewise y with channel 1).
    start_x, start_y = x1 * 0.5 - 0.5, y1 * 0.5 - 0.5
    roi_w, roi_h = x2 * 0.5 - 0.5 - start_x, y2 * 0.5 - 0.5 - start_y
    bin_w, bin_h = roi_w / 5, roi_h / 3
    dx = 0.1 * roi_w * arrays["offset"][0, 0, 1, 2]
    dy = 0.1 * roi_h * arrays["offset"][0, 1, 1, 2]
    expected = [(start_y + 1 * bin_h + (iy + 0.5) * bin_h / 2,
                 start_x + 2 * bin_w + (ix + 0.5) * bin_w / 2) for iy in range(2) for ix in range(2)]
    assert picture.regular == pytest.approx(np.array(expected))
    assert picture.deformed == pytest.approx(np.array(expected) + [dy, dx])
    assert picture.heat == pytest.approx(arrays["input"][int(batch)].mean(axis=0))
    if op == "modulated_deform_roi_pool":
        assert picture.weight == pytest.approx([arrays["mask"][0, 0, 1, 2]] * 4)
    else:
        assert picture.weight is None


PSROI = {"N": 1, "H": 12, "W": 13, "K": 2, "output_dim": 2, "group_size": 3, "pooled_size": 3,
         "part_size": 3, "sample_per_part": 2, "trans_std": 0.1, "no_trans": False,
         "num_classes": 2, "spatial_scale": 0.37}


def test_psroi_pool_sampling_follows_the_contract(tmp_path):
    path = sampling.save_case("deform_psroi_pool", PSROI, "float32", "random", 0,
                              tmp_path / "case.npz")
    picture = sampling.picture(path)
    _, arrays = casefile.load(path)
    batch, x1, y1, x2, y2 = arrays["rois"][0].astype(np.float64)

    def c_round(v):  # C's round: halves away from zero
        return np.sign(v) * np.floor(abs(v) + 0.5)

    # start = round(x1)·scale − 0.5, end = (round(x2) + 1)·scale − 0.5, roi = max(end − start,
    # 0.1), bin = roi / pooled, sub = bin / sample_per_part; class 0's trans moves the bin
    # by trans·trans_std·roi; samples at pw·bin + start + trans_x·roi + iw·sub.
    start_x, start_y = c_round(x1) * 0.37 - 0.5, c_round(y1) * 0.37 - 0.5
    roi_w = max((c_round(x2) + 1) * 0.37 - 0.5 - start_x, 0.1)
    roi_h = max((c_round(y2) + 1) * 0.37 - 0.5 - start_y, 0.1)
    trans_x = arrays["trans"][0, 0, 1, 1] * 0.1  # part cell floor(1/3·3) = 1, class 0
    trans_y = arrays["trans"][0, 1, 1, 1] * 0.1
    regular = [(1 * roi_h / 3 + start_y + ih * roi_h / 6, 1 * roi_w / 3 + start_x + iw * roi_w / 6)
               for ih in range(2) for iw in range(2)]
    assert picture.regular == pytest.approx(np.array(regular))
    assert picture.deformed == pytest.approx(np.array(regular) + [trans_y * roi_h, trans_x * roi_w])
    # Output channel 0 of bin (1, 1) reads input channel (0·3 + 1)·3 + 1 = 4.
    assert picture.heat == pytest.approx(arrays["input"][int(batch), 4])
    assert picture.weight is None


def test_msda_sampling_draws_every_level_side_by_side(tmp_path):
    params = {"N": 1, "Lq": 5, "M": 2, "D": 3, "L": 3, "P": 2, "H": 6, "W": 7, "softmax": True,
              "spatial_shapes": ""}
    path = sampling.save_case("ms_deform_attn", params, "float32", "random", 0, tmp_path / "c.npz")
    picture = sampling.picture(path)
    _, arrays = casefile.load(path)
    widths, heights = [7, 4, 2], [6, 3, 2]  # ceil(W / 2^l), ceil(H / 2^l)
    assert picture.heat.shape == (6, sum(widths) + 2)  # a NaN column between levels
    loc = arrays["sampling_locations"][0, 2, 0]  # query Lq // 2, head 0: [L, P, 2]
    first = 0
    for level, (h, w) in enumerate(zip(heights, widths, strict=True)):
        for p in range(2):
            # docs/ops-semantics.md: x = loc_x·W_l − 0.5, y = loc_y·H_l − 0.5 on level l.
            assert picture.deformed[level * 2 + p] == pytest.approx(
                [loc[level, p, 1] * h - 0.5, loc[level, p, 0] * w - 0.5 + first])
        start = int(arrays["level_start_index"][level])
        expected = arrays["value"][0, start:start + h * w, 0].astype(np.float64).mean(-1).reshape(h, w)
        assert picture.heat[:h, first:first + w] == pytest.approx(expected)
        first += w + 1
    logits = arrays["attention_weights"][0, 2, 0].reshape(-1)
    assert picture.weight == pytest.approx(np.exp(logits) / np.exp(logits).sum())
    assert len(picture.labels) == len(picture.regular) == 6
