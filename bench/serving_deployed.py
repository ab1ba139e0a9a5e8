"""The gates measure what serves: system-eval figures against the deployed configuration.

    python bench/serving_deployed.py [--repeats 5] [--seconds 4] [--image IMAGE --model-name NAME --shape H,W,C]

One inference image (by default ``small_cnn`` on 32x32x3 with random weights, exported and
built the pipeline's way; ``--image`` measures an image already built, e.g. ``make run``'s),
measured three ways in each repeat:

* **deployed**: :class:`nightshift.deploy.LocalDeployer` serves it, exactly as the nightly
  ``deploy`` does (:func:`nightshift.containers.run_serving_container`, request log on at the
  deployed rate, the deployed memory limit); the load client (``bench/serving.py``'s, i.e.
  :mod:`nightshift.loadgen`) drives the serving container's own port at c=16 just before and
  just after the system evaluation below (their mean is the repeat's deployed figure: the
  drift of the shared cores cancels in the pair), then at c=1, and the stable port (through
  the blue/green proxy) at c=16.
* **system eval**: :func:`nightshift.system_eval.run_system_eval` on a small synthetic test
  split, ``concurrency=16``, ``load_seconds`` as above: the figures the latency and throughput
  gates read (while the deployed container idles).
* **no request log**: the same image started through the same function with the request log
  off -- what system eval measured before issue 19 -- at c=16 and c=1.

Figures are medians over repeats; the system-eval / deployed ratio is also given per repeat.
Writes ``bench/results/serving_deployed.json`` and the section "Gates measured as served"
of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving as bench  # noqa: E402  (bench/serving.py: export_model, load, ROOT; puts plugins/ on sys.path)

RESULTS = bench.ROOT / "bench" / "results" / "serving_deployed.json"
#: the same measurement on the digits data's shape (``--shape 8,8,1 --out`` this), quoted beside it
RESULTS_8X8 = bench.ROOT / "bench" / "results" / "serving_deployed_8x8x1.json"
HEAD = "## Gates measured as served"
#: the stable port of the bench deployment (one proxy for every repeat)
PORT: dict[str, int] = {}


class _Split:
    """A synthetic test split for run_system_eval (the load phase sends its first image)."""

    def __init__(self, shape: tuple[int, int, int], n: int = 64, classes: int = 10):
        rng = np.random.default_rng(7)
        self.images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        self.labels = rng.integers(0, classes, n).astype(np.int64)
        self.class_names = [f"c{i}" for i in range(classes)]

    def iter_split(self, name: str):
        yield self.images, self.labels


def _load(url: str, model: str, shape: tuple[int, int, int], concurrency: int, seconds: float) -> dict:
    """bench/serving.py's load: loadgen, binary protocol, one random image per request, 2 s timeout."""
    from nightshift.loadgen import infer_request, run_load

    x = np.random.default_rng(2).integers(0, 256, (1, *shape), dtype=np.uint8)
    return run_load(url, infer_request(url, model, x, binary=True), concurrency=concurrency, duration_s=seconds,
                    timeout_s=2.0, warmup_s=0.5).summary()


def _figures(r: dict) -> dict:
    return {"rps": r["throughput_rps"], "p50_ms": r["latency_ms"]["p50"], "p95_ms": r["latency_ms"]["p95"],
            "p99_ms": r["latency_ms"]["p99"], "errors": r["errors"], "timeouts": r["timeouts"],
            "rejected_503": r["rejected_503"]}


def _server_log_counts(url: str) -> dict:
    import requests

    from nightshift.system_eval import request_log_counts

    with requests.Session() as http:
        http.trust_env = False
        return request_log_counts(http.get(f"{url}/metrics", timeout=5).text)


def deploy(client, image: str, model: str, root: Path, version: int):
    """Serve ``image`` with LocalDeployer (the deploy path): ``(deployer, container url)``."""
    from nightshift.containers import ServingConfig
    from nightshift.deploy import LocalDeployer
    from nightshift.settings import Settings

    d = LocalDeployer(client, model_name=model, artifact_root=root, port=PORT["stable"],
                      proxy_image=Settings.from_env().base_image, config=ServingConfig.from_env(), drain_timeout_s=5)
    state = d.deploy(image, registry_version=str(version), reason="bench")
    return d, f"http://127.0.0.1:{state['port']}"


def measure_system_eval(client, image: str, model: str, shape, seconds: float, work: Path,
                        onnx_path: Path | None) -> dict:
    from nightshift.system_eval import run_system_eval

    out_dir = work / "system_eval"
    shutil.rmtree(out_dir, ignore_errors=True)
    r = run_system_eval(image, _Split(shape), model_name=model, out_dir=out_dir, onnx_path=onnx_path,
                        docker_client=client, concurrency=16, load_seconds=seconds, request_timeout_s=2.0,
                        skew_tolerance=1.0)  # random weights: near-ties may flip; the skew is not measured here
    return {"c16": _figures(r["load"]), "request_log": r["request_log"], "serving": r["serving"]}


def measure_no_log(client, image: str, model: str, shape, seconds: float) -> dict:
    """The same image through the same function with the request log off (system eval before issue 19)."""
    from nightshift.containers import ServingConfig
    from nightshift.containers import InferenceContainer

    # InferenceContainer starts through containers.serving_run_kwargs too; no request_log_dir: log off
    with InferenceContainer(image, docker_client=client, config=ServingConfig.from_env()) as c:
        c.wait_ready(60)
        return {"c16": _figures(_load(c.url, model, shape, 16, seconds)),
                "c1": _figures(_load(c.url, model, shape, 1, seconds))}


def build_image(client, work: Path) -> tuple[str, str, tuple[int, int, int], Path]:
    from nightshift.inference_image import ImageBuilder
    from nightshift.settings import Settings

    s = Settings.from_env()
    model_dir = bench.export_model("small_cnn", work)
    meta = json.loads((model_dir / "model.json").read_text())
    built = ImageBuilder(client).build(onnx_path=model_dir / "model.onnx", model_meta=meta, model_name="small_cnn",
                                       repository="nightshift-bench", base_image=s.base_image, wheelhouse=s.wheelhouse)
    return built["image"], "small_cnn", bench.SHAPE, model_dir / "model.onnx"


def summarise(runs: list[dict]) -> dict:
    med = lambda xs: statistics.median([x for x in xs if x is not None]) if any(x is not None for x in xs) \
        else None  # noqa: E731
    out: dict = {}
    for kind, levels in (("deployed", ("c16", "c1", "proxy_c16")), ("system_eval", ("c16",)),
                         ("no_request_log", ("c16", "c1"))):
        out[kind] = {lv: {k: med([r[kind][lv][k] for r in runs]) for k in ("rps", "p50_ms", "p95_ms", "p99_ms")}
                     | {k: sum(r[kind][lv][k] for r in runs) for k in ("errors", "timeouts", "rejected_503")}
                     for lv in levels}
    per = [r["system_eval"]["c16"]["rps"] / r["deployed"]["c16"]["rps"] for r in runs
           if r["system_eval"]["c16"]["rps"] and r["deployed"]["c16"]["rps"]]
    out["ratio_system_eval_vs_deployed_c16_runs"] = [round(v, 3) for v in per]
    out["ratio_system_eval_vs_deployed_c16"] = round(statistics.median(per), 3) if per else None
    out["ratio_of_medians_c16"] = round(out["system_eval"]["c16"]["rps"] / out["deployed"]["c16"]["rps"], 3)
    out["ratio_p95_system_eval_vs_deployed_c16"] = round(
        out["system_eval"]["c16"]["p95_ms"] / out["deployed"]["c16"]["p95_ms"], 3)
    out["ratio_no_log_vs_deployed_c16"] = round(out["no_request_log"]["c16"]["rps"] / out["deployed"]["c16"]["rps"], 3)
    out["ratio_no_log_vs_deployed_c1"] = round(out["no_request_log"]["c1"]["rps"] / out["deployed"]["c1"]["rps"], 3)
    out["ratio_proxy_vs_direct_c16"] = round(out["deployed"]["proxy_c16"]["rps"] / out["deployed"]["c16"]["rps"], 3)
    out["loadavg_1min"] = [r.get("loadavg_1min") for r in runs]
    out["request_log_dropped"] = {"deployed": [r["deployed"]["request_log"].get("dropped") for r in runs],
                                  "system_eval": [r["system_eval"]["request_log"].get("dropped") for r in runs]}
    out["request_log_records"] = {"deployed": [r["deployed"]["request_log"].get("records") for r in runs],
                                  "system_eval": [r["system_eval"]["request_log"].get("records") for r in runs]}
    return out


def _digits_paragraph() -> str:
    """The 8×8×1 run's key figures (the issue's digits case: a cheap model), when there is one."""
    if not RESULTS_8X8.is_file():
        return ""
    r = json.loads(RESULTS_8X8.read_text())
    s = r["summary"]
    return (f"On the digits data's shape (small_cnn on 8×8×1, {r['repeats']} repeats, {r['date']}), where the model "
            f"is cheap and the request log's per-record work weighs more: deployed c=16 "
            f"{s['deployed']['c16']['rps']:,.0f}/s, system eval {s['system_eval']['c16']['rps']:,.0f}/s, "
            f"**{s['ratio_system_eval_vs_deployed_c16']:.2f}×** (per repeat {s['ratio_system_eval_vs_deployed_c16_runs']}; "
            f"ratio of medians {s['ratio_of_medians_c16']:.2f}×); request log off "
            f"{s['ratio_no_log_vs_deployed_c16']:.2f}× the deployed throughput at c=16, "
            f"{s['ratio_no_log_vs_deployed_c1']:.2f}× at c=1 (`bench/results/{RESULTS_8X8.name}`; the issue measured "
            f"10–11k against 3.8–3.9k req/s at c=16 and 5k against 2.5k at c=1 on `make run`'s digits image).\n")


def render(res: dict) -> str:
    s = res["summary"]
    d, e, n = s["deployed"], s["system_eval"]["c16"], s["no_request_log"]
    within = abs(s["ratio_system_eval_vs_deployed_c16"] - 1) <= 0.10
    proxy_note = (" (more, not less: on cores shared with other work the proxy's extra process wins the "
                  "bench a larger share of CPU time, so this is no measure of what the proxy costs)"
                  if s["ratio_proxy_vs_direct_c16"] > 1 else "")
    row = lambda label, f: (f"| {label} | {f['rps']:,.0f}/s | {f['p50_ms']:.2f} | {f['p95_ms']:.2f} | "  # noqa: E731
                            f"{f['p99_ms']:.2f} | {f['errors']} / {f['timeouts']} / {f['rejected_503']} |")
    return f"""{HEAD} (`bench/serving_deployed.py`, {res['date']}, {res['machine']['cpus']} CPUs)

Issue 19, item 5: the latency and throughput gates used to measure the image without the
request log, a configuration that never serves. Now `system_eval` starts the container
through `nightshift.containers.serving_run_kwargs`, the function `deploy` uses, with
`ServingConfig.from_env()` (request log on at the deployed sampling rate,
{res['config']['request_log_sample']:.1f}; memory limit {res['config']['mem_limit']}; the same environment); `tests/unit/test_system_eval.py` asserts the two `containers.run` calls differ
only in port, name, labels and restart policy. This run measures one image
({res['image_note']}) in {res['repeats']} repeats; each repeat deploys it afresh with
`LocalDeployer` (the nightly `deploy`), loads the serving container at c=16, runs
`run_system_eval` (c=16) while the deployed container idles, loads the deployed container at
c=16 again (the repeat's deployed figure is the mean of the two, so drift of the shared cores
cancels), then c=1 and c=16 through the stable port, and last the same image with the request
log off. {res['seconds']:.0f} s per load after a 0.5 s warm-up, the same load client
(`nightshift.loadgen`, binary protocol, 1 image per request, 2 s timeout); medians of repeats:

| configuration | throughput | p50 ms | p95 ms | p99 ms | errors / timeouts / 503s |
|---|---|---|---|---|---|
{row("deployed (LocalDeployer), c=16, container port", d['c16'])}
{row("**system eval** (`run_system_eval` load phase), c=16", e)}
{row("deployed, c=16, through the stable port (proxy)", d['proxy_c16'])}
{row("deployed, c=1, container port", d['c1'])}
{row("request log off (system eval before), c=16", n['c16'])}
{row("request log off (system eval before), c=1", n['c1'])}

**System eval / deployed at c=16: {s['ratio_system_eval_vs_deployed_c16']:.2f}×** (median of per-repeat
ratios {s['ratio_system_eval_vs_deployed_c16_runs']}; ratio of medians {s['ratio_of_medians_c16']:.2f}×;
p95 {s['ratio_p95_system_eval_vs_deployed_c16']:.2f}×): {"within" if within else "outside"} the 10% the issue asks for.
Without the request log the same image answers {s['ratio_no_log_vs_deployed_c16']:.2f}× the deployed
throughput at c=16 and {s['ratio_no_log_vs_deployed_c1']:.2f}× at c=1: the gap the gates used to hide.
Clients of the stable port go through the blue/green TCP proxy (a Python asyncio byte pipe in
its own container, on the same cores): {s['ratio_proxy_vs_direct_c16']:.2f}× of the container's own
port at c=16{proxy_note}; the gates measure the serving container, not the proxy in front of it.
Request-log records written per repeat (server `/metrics`): deployed {s['request_log_records']['deployed']},
system eval {s['request_log_records']['system_eval']}; samples dropped because the writer's queue was
full: deployed {s['request_log_dropped']['deployed']}, system eval {s['request_log_dropped']['system_eval']}.
{_digits_paragraph()}Load average (1 min) of the machine after each repeat, the bench's own server and client
included: {s['loadavg_1min']} (other work shared the {res['machine']['cpus']} cores, so the absolute
figures sit below the serving section's; the system-eval / deployed ratio, measured back to back,
is what this section is about).
Raw figures: `bench/results/serving_deployed.json`.
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--image", help="an inference image already built (default: build small_cnn)")
    ap.add_argument("--model-name", help="its served model name (with --image)")
    ap.add_argument("--shape", help="its input H,W,C (with --image); without: build small_cnn for this input "
                                    "shape (default 32,32,3; 8,8,1 is the digits data's)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--render", action="store_true", help="only rewrite the docs section from --out")
    args = ap.parse_args()
    if args.render:
        res = json.loads(Path(args.out).read_text())
        from docs_section import write_section

        write_section(HEAD, render(res), before="## Data path at scale")
        return 0
    import docker

    from nightshift.containers import ServingConfig
    from nightshift.inference_image import remove_image

    client = docker.from_env(timeout=600)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="nightshift-bench-deployed-") as tmp:
        work = Path(tmp)
        if args.image:
            if not (args.model_name and args.shape):
                raise SystemExit("--image needs --model-name and --shape")
            # (an image built elsewhere, e.g. make run's digits image)
            image, model, shape, onnx = args.image, args.model_name, tuple(int(v) for v in args.shape.split(",")), None
            note = f"`{image}`"
        else:
            if args.shape:  # e.g. 8,8,1: the digits data's shape, where the model is cheap
                bench.SHAPE = tuple(int(v) for v in args.shape.split(","))
            image, model, shape, onnx = build_image(client, work)
            note = (f"small_cnn on {'×'.join(map(str, shape))}, random weights, exported and built the "
                    "pipeline's way")
        deploy_root = work / "deploy"
        PORT["stable"] = bench.free_port()
        try:
            for i in range(args.repeats):
                run: dict = {}
                deployer, direct = deploy(client, image, model, deploy_root, i + 1)
                time.sleep(1.0)  # let the deploy's container churn settle (as before the "after" load)
                before = _figures(_load(direct, model, shape, 16, args.seconds))
                run["system_eval"] = measure_system_eval(client, image, model, shape, args.seconds, work, onnx)
                time.sleep(1.0)  # the system-eval container's removal settles
                after = _figures(_load(direct, model, shape, 16, args.seconds))
                run["deployed"] = {
                    "c16": {k: (before[k] + after[k]) / 2 if k.endswith(("rps", "_ms")) else before[k] + after[k]
                            for k in before},
                    "c16_before": before, "c16_after": after,
                    "c1": _figures(_load(direct, model, shape, 1, args.seconds)),
                    "proxy_c16": _figures(_load(deployer.url, model, shape, 16, args.seconds)),
                    "request_log": _server_log_counts(direct)}
                shutil.rmtree(deploy_root / "request_logs", ignore_errors=True)  # load traffic, MBs
                run["no_request_log"] = measure_no_log(client, image, model, shape, args.seconds)
                run["loadavg_1min"] = round(os.getloadavg()[0], 2)  # other work on the shared cores
                runs.append(run)
                print(f"repeat {i + 1}/{args.repeats}: deployed c16 {before['rps']:,.0f}/s | system eval c16 "
                      f"{run['system_eval']['c16']['rps']:,.0f}/s | deployed c16 {after['rps']:,.0f}/s; "
                      f"no log c16 {run['no_request_log']['c16']['rps']:,.0f}/s; proxy c16 "
                      f"{run['deployed']['proxy_c16']['rps']:,.0f}/s; load average {run['loadavg_1min']}", flush=True)
        finally:
            from nightshift.deploy import LocalDeployer

            if deploy_root.exists():
                LocalDeployer(client, model_name=model, artifact_root=deploy_root).undeploy()
            if not args.image:
                remove_image(image, client)
    cfg = ServingConfig.from_env()
    res = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
           "image_note": note, "repeats": args.repeats, "seconds": args.seconds,
           "config": {"mem_limit": cfg.mem_limit, "request_log_sample": cfg.request_log_sample},
           "summary": summarise(runs), "runs": runs}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["summary"], indent=1))
    if not args.no_docs:
        from docs_section import write_section

        write_section(HEAD, render(res), before="## Data path at scale")
    return 0


if __name__ == "__main__":
    sys.exit(main())
