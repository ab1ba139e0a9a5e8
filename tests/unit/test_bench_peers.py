"""The serving bench's peer comparison (``bench/peers/``): its pure helpers only -- round order,
Prometheus parsing, the per-load breakdown, the target ratios -- and the load client's reading
of chunked answers (KServe sends its binary replies chunked). Nothing here installs or starts a peer."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from peers.compare import (  # noqa: E402
    breakdown,
    metric,
    paired_ratios,
    parse_prometheus,
    rotation,
    server_counters,
    target_ratios,
)

from nightshift.loadgen import dechunk  # noqa: E402


def test_rotation_gives_every_server_every_position():
    names = ["nightshift", "kserve", "pytriton"]
    orders = [rotation(names, i) for i in range(3)]
    assert orders[0] == names and orders[1] == ["kserve", "pytriton", "nightshift"]
    for pos in range(3):
        assert {o[pos] for o in orders} == set(names)
    assert rotation(names, 3) == names and rotation([], 2) == []


TRITON = """# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="small_cnn",version="1"} 160
nv_inference_count{model="other",version="1"} 999
nv_inference_exec_count{model="small_cnn",version="1"} 10
nv_inference_request_success{model="small_cnn",version="1"} 160
nv_inference_request_duration_us{model="small_cnn",version="1"} 320000
nv_inference_queue_duration_us{model="small_cnn",version="1"} 32000
nv_inference_compute_infer_duration_us{model="small_cnn",version="1"} 160000
"""


def test_prometheus_samples_are_summed_over_matching_labels_only():
    s = parse_prometheus(TRITON)
    assert metric(s, "nv_inference_count", model="small_cnn") == 160
    assert metric(s, "nv_inference_count") == 160 + 999
    assert metric(s, "nv_inference_count", model="absent") == 0.0
    assert metric(s, "no_such_metric") == 0.0


def test_triton_breakdown_is_the_difference_of_two_scrapes_per_request():
    before = server_counters("pytriton", TRITON, "small_cnn")
    after_text = (TRITON.replace("} 160\n", "} 260\n").replace("exec_count{model=\"small_cnn\",version=\"1\"} 10",
                                                              "exec_count{model=\"small_cnn\",version=\"1\"} 14")
                  .replace("} 320000", "} 520000"))
    after = server_counters("pytriton", after_text, "small_cnn")
    b = breakdown("pytriton", before, after)
    assert b["mean_batch"] == 25.0  # 100 images in 4 executions
    assert b["request_us"] == 2000.0  # 200 ms over 100 requests
    assert b["queue_us"] == 0.0  # requests answered, its counter did not move: 0 per request


def test_nightshift_breakdown_reads_batches_and_stages():
    text = ('nightshift_batch_size_sum 40.0\nnightshift_batch_size_count 10.0\n'
            'nightshift_request_duration_seconds_count{route="infer"} 40.0\n'
            'nightshift_request_duration_seconds_sum{route="infer"} 0.08\n'
            'nightshift_request_duration_seconds_count{route="ready"} 7.0\n'
            'nightshift_stage_duration_seconds_sum{stage="queue"} 0.04\n'
            'nightshift_stage_duration_seconds_count{stage="queue"} 40.0\n')
    b = breakdown("nightshift", server_counters("nightshift", "", "m"), server_counters("nightshift", text, "m"))
    assert b["mean_batch"] == 4.0 and b["request_us"] == 2000.0 and b["queue_us"] == 1000.0
    assert b["inference_us"] is None  # no inference samples: not measured, not zero


def test_kserve_breakdown_reads_its_model_histograms():
    text = ('request_predict_seconds_sum{model_name="small_cnn"} 1.5\n'
            'request_predict_seconds_count{model_name="small_cnn"} 1000.0\n'
            'request_preprocess_seconds_sum{model_name="small_cnn"} 0.0\n'
            'request_preprocess_seconds_count{model_name="small_cnn"} 1000.0\n')
    b = breakdown("kserve", server_counters("kserve", "", "small_cnn"), server_counters("kserve", text, "small_cnn"))
    assert b == {"preprocess_us": 0.0, "predict_us": 1500.0, "postprocess_us": None}


def _summary(rps, p99=10.0):
    return {"throughput_rps": rps, "latency_ms": {"p99": p99}}


def test_target_ratios_are_medians_of_per_round_ratios():
    rounds = {
        "nightshift": {1: [_summary(1000), _summary(900), _summary(1200)],
                       16: [_summary(3000), _summary(2400), _summary(3300)],
                       64: [_summary(3000, 40), _summary(3000, 50), _summary(3000, 30)]},
        "kserve": {16: [_summary(1000), _summary(1000), _summary(1000)]},
        "kserve_json": {16: [_summary(500), _summary(1200), _summary(1000)]},
        "pytriton": {1: [_summary(500), _summary(1000), _summary(1000)],
                     16: [_summary(3000), _summary(3000), _summary(3000)],
                     64: [_summary(2000, 80), _summary(2000, 40), _summary(2000, 60)]},
    }
    t = target_ratios(rounds)
    # against KServe's faster encoding per round: 3000/1000, 2400/1200, 3300/1000
    assert t["nightshift_over_kserve_c16"]["rounds"] == [3.0, 2.0, 3.3]
    assert t["nightshift_over_kserve_c16"]["median"] == 3.0 and t["nightshift_over_kserve_c16"]["met"] is True
    # each encoding on its own too: binary 3.0, 2.4, 3.3; JSON 6.0, 2.0, 3.3
    assert t["nightshift_over_kserve_c16"]["binary_median"] == 3.0
    assert t["nightshift_over_kserve_c16"]["json_median"] == 3.3
    assert t["nightshift_over_pytriton_c1"]["median"] == 1.2 and t["nightshift_over_pytriton_c1"]["met"] is True
    assert t["nightshift_over_pytriton_c16"]["median"] == 1.0 and t["nightshift_over_pytriton_c16"]["met"] is True
    # p99 ratios 0.5, 1.25, 0.5: lower is better
    p99 = t["nightshift_p99_over_pytriton_p99_c64"]
    assert p99["median"] == 0.5 and p99["met"] is True and p99["target"] == "<= 1"


def test_target_ratios_say_not_measured_instead_of_inventing_a_figure():
    rounds = {"nightshift": {16: [_summary(3000)]}, "pytriton": {16: [_summary(None)]}}
    t = target_ratios(rounds)
    assert t["nightshift_over_pytriton_c16"] == {"median": None, "rounds": [], "target": ">= 1", "met": None}
    assert t["nightshift_over_kserve_c16"]["met"] is None  # KServe was not run


def test_paired_ratios_drop_rounds_without_an_answer():
    assert paired_ratios([10, None, 30, 0], [5, 5, None, 5]) == [2.0]
    with pytest.raises(ValueError):
        paired_ratios([1, 2], [1])  # rounds must pair up


@pytest.mark.parametrize("body, expected", [
    (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    (b"c5;ext=1\r\n" + b"x" * 0xc5 + b"\r\n0\r\n\r\n", b"x" * 0xc5),  # hex size with an extension
    (b"0\r\n\r\n", b""),
])
def test_dechunk_reads_complete_bodies(body, expected):
    got = dechunk(b"HEAD" + body + b"NEXT", 4)
    assert got == (expected, 4 + len(body))


@pytest.mark.parametrize("cut", [1, 3, 8, 12, 20])
def test_dechunk_waits_for_the_rest_of_a_body(cut):
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert dechunk(body[:cut], 0) is None
    assert dechunk(body[:-1], 0) is None  # the final CRLF is part of the body


def test_dechunk_rejects_a_malformed_size():
    with pytest.raises(ValueError):
        dechunk(b"zz\r\nhello\r\n0\r\n\r\n", 0)


def test_the_client_protocol_reads_a_chunked_answer_fed_byte_by_byte():
    """KServe answers binary-extension requests chunked (no Content-Length); every byte reaches
    the protocol on its own and the body completes with the final CRLF, leaving the next answer."""
    from nightshift.loadgen import _Connection

    class Transport:
        def write(self, data: bytes) -> None:
            pass

        def close(self) -> None:
            pass

    answer = (b"HTTP/1.1 200 OK\r\ninference-header-content-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"
              b"4\r\n{}ab\r\n0\r\n\r\n")

    async def main():
        conn = _Connection()
        conn.connection_made(Transport())
        fut = conn.request(b"GET / HTTP/1.1\r\n\r\n")
        for i in range(len(answer)):
            assert not fut.done(), f"answered after {i} of {len(answer)} bytes"
            conn.data_received(answer[i:i + 1])
        status, body, close = await fut
        assert (status, body, close) == (200, b"{}ab", False) and not conn.buf

    asyncio.run(main())
