"""Post-training int8 quantization (nightshift.quantization): the calibration sample; the quantized
export as a whole is in test_export.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from nightshift.errors import DataError
from nightshift.quantization import float_only_nodes, sample_images


def test_calibration_sample_is_seeded_and_spans_shards():
    shards = [(np.full((100, 2, 2, 1), k, np.uint8), np.zeros(100)) for k in range(5)]
    a, b = sample_images(shards, 50), sample_images(iter(shards), 50)
    assert a.shape == (50, 2, 2, 1) and (a == b).all()
    assert len(np.unique(a[:, 0, 0, 0])) == 5  # not just the first shard
    assert sample_images([np.zeros((3, 2, 2, 1), np.uint8)], 50).shape == (3, 2, 2, 1)


def test_a_sample_of_more_images_than_there_are_is_all_of_them_and_none_is_an_error():
    parts = [np.full((3, 2, 2, 1), i, np.uint8) for i in range(2)]
    got = sample_images(iter(parts), 100)
    assert got.shape == (6, 2, 2, 1) and sorted(got[:, 0, 0, 0].tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="calibration split is empty"):
        sample_images(iter([np.zeros((0, 2, 2, 1), np.uint8)]), 4)


def test_preprocessing_and_softmax_stay_float():
    nodes = [helper.make_node("Cast", ["x"], ["f"], name="cast"), helper.make_node("Div", ["f", "s"], ["n"], name="norm"),
             helper.make_node("Conv", ["n", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Softmax", ["r"], ["p"], name="softmax")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, None)],
                              [helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, None)])
    assert float_only_nodes(helper.make_model(graph)) == ["cast", "norm", "softmax"]
