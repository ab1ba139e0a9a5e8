"""Request-log records as the serving image writes them, for the monitoring tests."""

from __future__ import annotations

from datetime import timedelta

import numpy as np


def served_records(images, onnx_path, classes, start, version="v"):
    """What the serving image writes for these images (docs/serving.md, request log)."""
    import onnxruntime as ort

    from nightshift.data.decode import image_stats

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    logits, emb = sess.run(["logits", "embedding"], {"pixels": images})
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    st = image_stats(images)
    return [{"schema": "nightshift.request_log/1",
             "timestamp": (start + timedelta(seconds=i)).isoformat().replace("+00:00", "Z"),
             "model_name": "digits", "model_version": version, "brightness": float(st["brightness"][i]),
             "contrast": float(st["contrast"][i]), "mean_ch0": float(st["mean_ch0"][i]),
             "predicted_class": classes[int(p[i].argmax())], "confidence": float(p[i].max()),
             "embedding": emb[i].tolist()} for i in range(len(images))]
