"""Restartable training: last.pt every epoch, resume bit-identical on CPU, refusals,
a located NaN, out-of-memory advice, the progress line, lineage and the confusion matrix."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nightshift import training
from nightshift.errors import (CheckpointMismatch, ConfigError, DataError, DeviceOutOfMemory, TrainingDiverged)

ROOT = Path(__file__).resolve().parents[2]
#: 42 train images of 8x8 in batches of 16: 3 steps per epoch, a fraction of a second each on CPU.
HP = {"epochs": 3, "width": 4, "batch_size": 16}
COMPARED = ("test_accuracy", "test_loss", "val_accuracy", "train_loss")


def _snapshot(root: Path, *, classes: int = 2, per_class: int = 30, shard_mb: float | None = None):
    from tests.snapshots import digits_subset_snapshot

    return digits_subset_snapshot(root, classes=classes, per_class=per_class, val_fraction=0.15,
                                  test_fraction=0.2, shard_mb=shard_mb)


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread here and in the children: the same kernels (so the same sums) in
    every process, and no thread oversubscription on a busy machine with these tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    return _snapshot(tmp_path_factory.mktemp("resume-snap"))


def _epoch_of(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - not there yet
        return None


def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = training.load_checkpoint(a)["state_dict"], training.load_checkpoint(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _stop_after(path: Path, epoch: int):
    return lambda: (_epoch_of(path) or 0) >= epoch


# --- kill -9 and resume ------------------------------------------------------------------------------------------

CHILD = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from nightshift.data.snapshot import load_snapshot
from nightshift.training import train
hold = int(sys.argv[5])


def on_epoch(epoch, metrics):
    if epoch == hold:  # last.pt holds this epoch: wait here to be killed (0: never)
        time.sleep(3600)


r = train(load_snapshot(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), on_epoch=on_epoch)
print(json.dumps({"metrics": r.metrics, "resumed_from_epoch": r.manifest["resumed_from_epoch"]}))
"""


def _child(script: Path, snap, out: Path, hp: dict, hold_after: int) -> subprocess.Popen:
    """Train in a child process; ``hold_after``: the epoch after which it waits to be killed (0: none)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(script), str(snap.path), str(out), json.dumps(hp), "1",
                             str(hold_after)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_training_killed_after_an_epoch_resumes_to_identical_weights_and_metrics(snap, tmp_path):
    """A child process trains, is SIGKILLed once last.pt holds a finished epoch, and a second
    child finishes the same out_dir: same metrics and the same weights, bit for bit, as a run
    that was never interrupted."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out, last = tmp_path / "killed", tmp_path / "killed" / "last.pt"
    # the child waits after its first epoch until it is killed: however fast or slow this machine
    # is, the kill lands between two epochs, never after the last one
    first = _child(script, snap, out, HP, hold_after=1)
    reference = training.train(snap, tmp_path / "reference", HP)  # meanwhile, uninterrupted, in this process
    deadline = time.monotonic() + 60
    while (_epoch_of(last) or 0) < 1:
        assert first.poll() is None, f"the child ended before its first checkpoint: {first.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no last.pt after 60 s"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    killed_at = _epoch_of(last)
    assert 1 <= killed_at < HP["epochs"] and not (out / "checkpoint.pt").exists()

    second = _child(script, snap, out, HP, hold_after=0)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr[-3000:]
    resumed = json.loads(stdout.strip().splitlines()[-1])
    assert resumed["resumed_from_epoch"] == killed_at
    assert {k: resumed["metrics"][k] for k in COMPARED} == {k: reference.metrics[k] for k in COMPARED}
    assert _same_weights(out / "checkpoint.pt", reference.checkpoint_path)


# --- resume in process: the streamed feed, a finished run, what is refused ---------------------------------------

def test_streamed_training_resumes_bit_identically_and_keeps_its_feed(tmp_path):
    snap = _snapshot(tmp_path, shard_mb=1000 / 2**20)  # ~15 images a shard: several shards
    assert len(snap.shard_digests) >= 3
    hp = {**HP, "preload_budget_mb": 0.0001}  # smaller than any split: streamed, shard order shuffled per epoch
    reference = training.train(snap, tmp_path / "reference", hp)
    assert reference.manifest["data_feed"] == "stream"

    out = tmp_path / "resumed"
    with pytest.raises(InterruptedError):
        training.train(snap, out, hp, should_stop=_stop_after(out / "last.pt", 2))
    assert _epoch_of(out / "last.pt") == 2
    # a budget that would preload now: the resumed run keeps the checkpoint's (streamed) feed
    replayed = []
    resumed = training.train(snap, out, {**hp, "preload_budget_mb": 10_000},
                             on_epoch=lambda e, m: replayed.append(e))
    assert resumed.manifest["data_feed"] == "stream" and resumed.manifest["resumed_from_epoch"] == 2
    assert replayed == [1, 2, 3]  # the two recorded epochs replayed to on_epoch, then the one trained
    assert {k: resumed.metrics[k] for k in COMPARED} == {k: reference.metrics[k] for k in COMPARED}
    assert _same_weights(resumed.checkpoint_path, reference.checkpoint_path)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in reference.history]

    from nightshift.data.loader import StreamedSplit

    a = StreamedSplit(snap, "train", torch.device("cpu"), 16, torch.Generator(), seed=0)
    b = StreamedSplit(snap, "train", torch.device("cpu"), 16, torch.Generator(), seed=0)
    assert [a.shard_order(e) for e in (1, 2, 3)] == [b.shard_order(e) for e in (1, 2, 3)]
    assert len({tuple(a.shard_order(e)) for e in range(1, 9)}) > 1  # reshuffled per epoch


def test_a_finished_run_is_returned_again_without_training(snap, tmp_path):
    first = training.train(snap, tmp_path, HP)
    again = training.train(snap, tmp_path, HP)  # e.g. a retry after the MLflow upload failed
    assert again.manifest["resumed_from_epoch"] == HP["epochs"]
    assert again.metrics == first.metrics  # train_seconds included: nothing was trained again
    assert _same_weights(first.checkpoint_path, again.checkpoint_path)


def test_a_checkpoint_of_other_settings_or_data_is_refused_and_kept(snap, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InterruptedError):
        training.train(snap, out, HP, should_stop=_stop_after(out / "last.pt", 1))
    last = out / "last.pt"
    before = last.read_bytes()
    with pytest.raises(CheckpointMismatch, match=r"hparam lr: checkpoint 0\.003, this run 0\.01.*rm .*last\.pt"):
        training.train(snap, out, {**HP, "lr": 0.01})
    with pytest.raises(CheckpointMismatch, match=r"hparam epochs: checkpoint 3, this run 4"):
        training.train(snap, out, {**HP, "epochs": 4})
    other = _snapshot(tmp_path / "other", classes=3, per_class=20)
    with pytest.raises(CheckpointMismatch, match=r"data digest: .*classes: checkpoint 2 .*this run 3"):
        training.train(other, out, HP)
    assert last.read_bytes() == before and not (out / "checkpoint.pt").exists()  # nothing overwritten
    err = CheckpointMismatch("x")
    assert isinstance(err, ConfigError) and not err.retryable
    # a setting that does not change the weights may differ: the run resumes
    r = training.train(snap, out, {**HP, "eval_batch_size": 7})
    assert r.manifest["resumed_from_epoch"] == 1


def test_a_damaged_checkpoint_is_an_error_naming_the_file(snap, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InterruptedError):
        training.train(snap, out, HP, should_stop=_stop_after(out / "last.pt", 1))
    last = out / "last.pt"
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])  # truncated
    damaged = last.read_bytes()
    with pytest.raises(DataError, match=rf"{re.escape(str(last))} cannot be read.*rm {re.escape(str(last))}"):
        training.train(snap, out, HP)
    assert last.read_bytes() == damaged  # kept for a person to look at
    torch.save({"format": "something/else"}, last)
    with pytest.raises(DataError, match="not a resume checkpoint"):
        training.train(snap, out, HP)
    assert training.train(snap, out, HP, resume=False).manifest["resumed_from_epoch"] is None  # explicit restart


# --- a non-finite loss, out of memory ----------------------------------------------------------------------------

def test_a_non_finite_loss_names_epoch_and_step_and_keeps_the_previous_checkpoint(snap, tmp_path, monkeypatch):
    """The training loss returns NaN at its 5th call (epoch 2, step 2 of 3): the error names
    exactly that step, found from per-step losses read once at the end of the epoch, and
    epoch 1's last.pt is left as it was."""
    calls = {"n": 0}

    class NaNAtFifthStep(torch.nn.CrossEntropyLoss):
        def forward(self, input, target):
            calls["n"] += 1
            loss = super().forward(input, target)
            return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NaNAtFifthStep)
    out = tmp_path / "out"
    saved = {}
    with pytest.raises(TrainingDiverged) as info:
        training.train(snap, out, HP, on_epoch=lambda e, m: saved.setdefault(e, (out / "last.pt").read_bytes()))
    msg = str(info.value)
    assert "loss became nan at epoch 2/3, step 2/3 of the epoch (global step 5 of 9)" in msg
    assert re.search("diverged.*Lower lr", msg) and f"{out / 'last.pt'} (epoch 1), is kept" in msg
    assert list(saved) == [1] and (out / "last.pt").read_bytes() == saved[1]
    state = torch.load(out / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not TrainingDiverged.retryable


def test_a_real_divergence_also_names_its_step(tmp_path):
    snap = _snapshot(tmp_path, per_class=10)
    with pytest.raises(TrainingDiverged, match=r"at epoch [12]/2, step \d+/\d+ of the epoch \(global step \d+ of \d+\)"):
        training.train(snap, tmp_path / "out", {"epochs": 2, "width": 8, "lr": 1e30})


def test_out_of_memory_in_a_step_says_what_to_lower(snap, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "augment", oom)
    with pytest.raises(DeviceOutOfMemory) as info:
        training.train(snap, tmp_path / "out", HP)
    msg = str(info.value)
    assert isinstance(info.value, ConfigError) and not info.value.retryable
    for part in ("training (epoch 1/3)", "batch_size=16", "width=4", "RAM available", "Lower batch_size",
                 "preload_budget_mb", "smaller width", "Tried to allocate 2.00 GiB"):
        assert part in msg, (part, msg)


def test_out_of_memory_while_preloading_says_so(snap, tmp_path, monkeypatch):
    from nightshift.data import loader

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    out = tmp_path / "out"
    with pytest.raises(InterruptedError):  # a preloaded run's last.pt: a resume must preload again
        training.train(snap, out, HP, should_stop=_stop_after(out / "last.pt", 1))
    monkeypatch.setattr(loader.PreloadedSplit, "__init__", oom)
    with pytest.raises(DeviceOutOfMemory, match="while loading the train split onto the device.*preload_budget_mb"):
        training.train(snap, tmp_path / "fresh", HP)
    with pytest.raises(DeviceOutOfMemory, match=rf"resumed {re.escape(str(out / 'last.pt'))}, which fixes the feed"):
        training.train(snap, out, HP)


# --- progress, lineage, confusion matrix, the checkpoint files ----------------------------------------------------

@pytest.fixture(scope="module")
def observed(snap, tmp_path_factory):
    """One run, with its log records and on_epoch calls."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    log = logging.getLogger("nightshift.training")
    handler, level = Keep(level=logging.INFO), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    calls: list[tuple[int, dict]] = []
    out = tmp_path_factory.mktemp("observed")
    try:
        r = training.train(snap, out, HP, on_epoch=lambda e, m: calls.append((e, dict(m))))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return r, records, calls, out


def test_one_progress_line_per_epoch_and_eta_in_the_epoch_metrics(observed):
    r, records, calls, _ = observed
    lines = [rec.getMessage() for rec in records if rec.getMessage().startswith("epoch ")]
    assert len(lines) == HP["epochs"] and all(rec.levelno == logging.INFO for rec in records)
    pattern = r"epoch (\d+)/3  loss \d+\.\d{3}  val_acc \d\.\d{3}  [\d,]+ img/s  ETA \d+:\d\d:\d\d"
    assert [int(re.fullmatch(pattern, line).group(1)) for line in lines] == [1, 2, 3], lines
    assert [e for e, _ in calls] == [1, 2, 3]
    for e, m in calls:
        assert m["epoch_wall_seconds"] > 0 and m["eta_seconds"] >= 0
        walls = [mm["epoch_wall_seconds"] for _, mm in calls[:e]]
        assert m["eta_seconds"] == pytest.approx(sum(walls) / e * (3 - e))
    assert calls[-1][1]["eta_seconds"] == 0


def test_manifest_records_lineage_and_the_test_confusion_matrix(observed, snap):
    r, _, _, out = observed
    m = json.loads((out / "train_manifest.json").read_text())
    for key in ("hparams", "seed", "data_digest", "snapshot", "git_sha", "packages", "versions", "device_name",
                "epoch_wall_seconds", "resumed_from_epoch"):
        assert key in m, key
    assert m["snapshot"] == str(snap.path) and m["data_digest"] == snap.digest and m["resumed_from_epoch"] is None
    assert set(m["versions"]) >= {"python", "torch", "cuda", "cudnn", "onnxruntime", "numpy"}
    assert any(p.lower().startswith("torch==") for p in m["packages"]) and len(m["epoch_wall_seconds"]) == 3
    cm = r.manifest["confusion_matrix"]
    k = len(snap.class_names)
    assert m["confusion_matrix"] == cm and len(cm) == k and all(len(row) == k for row in cm)
    assert all(isinstance(v, int) for row in cm for v in row)
    n = snap.count("test")
    _, y = snap.split("test")
    assert sum(map(sum, cm)) == n and [sum(row) for row in cm] == np.bincount(y, minlength=k).tolist()
    assert sum(cm[i][i] for i in range(k)) / n == pytest.approx(r.metrics["test_accuracy"])
    ckpt = training.load_checkpoint(r.checkpoint_path)  # what export reads is unchanged, plus the manifest
    assert set(ckpt) >= {"model_config", "state_dict", "class_names", "hparams", "data_digest", "metrics", "manifest"}


def test_last_pt_is_weights_only_and_holds_the_whole_training_state(observed):
    _, _, _, out = observed
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["format"] == training.RESUME_FORMAT and last["epoch"] == 3 and last["global_step"] == 9
    for key in ("state_dict", "optimizer", "scheduler", "rng", "history", "hparams", "model_config", "data_digest",
                "train_seconds", "first_step_seconds", "environment", "data_feed"):
        assert key in last, key
    assert set(last["rng"]) >= {"python", "numpy", "torch", "cuda", "generator"}
    assert isinstance(last["rng"]["generator"], torch.Tensor)


def test_evaluate_accumulates_a_confusion_matrix_over_batches_and_shards():
    class Fixed(torch.nn.Module):  # predicts class (first pixel % 3)
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long() % 3, 3).float() * 5, None

    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 2, 0])
    out = training.evaluate(Fixed(), [(x[:4], y[:4]), (x[4:], y[4:])], batch_size=3, num_classes=3)
    pred = (torch.arange(10) % 3).tolist()
    expected = [[sum(1 for t, p in zip(y.tolist(), pred) if (t, p) == (i, j)) for j in range(3)] for i in range(3)]
    assert out["confusion"] == expected and out["accuracy"] == pytest.approx(sum(expected[i][i] for i in range(3)) / 10)
    assert "confusion" not in training.evaluate(Fixed(), x, y)
