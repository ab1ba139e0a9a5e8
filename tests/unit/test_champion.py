"""One writer for ``champion`` and the serving port (issue 19, items 3, 4 and 11).

Pure tests: a real MLflow registry (SQLite) and the real lock, with a fake deployer
that moves a simulated port exactly as ``LocalDeployer`` does (start green, switch,
record, stop blue) and calls the same hooks. The same race on the real Docker
daemon is in ``test_deploy.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nightshift import champion, contracts, registry, state
from nightshift.errors import ConfigError, ServingError
from nightshift.gates import Decision

MODEL = "m"


# --------------------------------------------------------------------------- a simulated port


class World:
    """What the Docker host would hold: containers, the proxy's upstream, the recorded state."""

    def __init__(self, images: set[str]):
        self.images = set(images)
        self.containers: dict[str, str] = {}  # name -> registry version
        self.upstream: str | None = None      # the container the stable port forwards to
        self.state: dict | None = None
        self.in_flight = 0
        self.overlaps = 0
        self.mutex = threading.Lock()
        self.seq = 0

    def serving(self) -> str | None:
        return self.containers.get(self.upstream) if self.upstream else None


class FakeDeployer:
    """The ``LocalDeployer`` surface ``nightshift.champion`` uses; no lock of its own, so the
    critical section under test is the one :mod:`nightshift.champion` holds."""

    def __init__(self, world: World, root: Path, hook=None, fail: bool = False):
        self.world, self.store, self.model_name, self.hook, self.fail = world, root, MODEL, hook, fail
        self.client = SimpleNamespace(images=SimpleNamespace(get=self._image))

    def _image(self, image):
        from docker.errors import ImageNotFound

        if image not in self.world.images:
            raise ImageNotFound(f"no such image: {image}")
        return SimpleNamespace(id=f"sha256:{image}")

    def _point(self, name):
        if self.hook:
            self.hook(name)
        time.sleep(0.005)  # give a writer that ignores the lock every chance to slip in

    def deploy(self, image, *, registry_version, model_version=None, reason=""):
        w = self.world
        with w.mutex:
            w.in_flight += 1
            w.overlaps += w.in_flight > 1
        try:
            current = w.state
            if current and current["registry_version"] == registry_version and w.upstream == current["container"]:
                return {**current, "changed": False}
            with w.mutex:
                w.seq += 1
                green = f"serve-v{registry_version}-{w.seq}"
                w.containers[green] = registry_version
            self._point("green_started")
            if self.fail:
                del w.containers[green]
                raise ServingError(f"green {green} was not ready")
            self._point("before_switch")
            w.upstream = green
            self._point("before_record")
            w.state = {"registry_version": registry_version, "container": green, "url": "fake", "image": image}
            if current and current["container"] != green:
                w.containers.pop(current["container"], None)  # blue stops
            return {**w.state, "changed": True}
        finally:
            with w.mutex:
                w.in_flight -= 1


# --------------------------------------------------------------------------- registry set-up


_CLIENTS: dict[str, object] = {}


def _client(tmp_path):
    """One MLflow client per database (threads share it; a new one costs a schema check)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if uri not in _CLIENTS:
        _CLIENTS[uri] = registry.client(uri)
    return _CLIENTS[uri]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Versions 1, 2, 3 promoted in turn (history recorded; champion = 3), built once and
    copied for each test."""
    base = tmp_path_factory.mktemp("champion-template")
    c = registry.client(f"sqlite:///{base / 'mlflow.db'}")
    root = base / "artifacts"
    (base / "onnx").mkdir()
    (base / "onnx" / "model.onnx").write_bytes(b"x")
    for i in (1, 2, 3):
        with registry.training_run(c, "exp", f"r{i}", tags={}, params={},
                                   artifact_location=(base / "art").as_uri()) as run_id:
            registry.log_artifacts(c, run_id, base / "onnx", "onnx")
        prev = registry.get_champion(c, MODEL)
        out = registry.register_candidate(
            c, MODEL, run_id, artifact_path="onnx", tags={"onnx_sha256": f"{i}" * 64, "image": f"img:{i}"},
            decision=Decision("BLESSED", "test", prev["version"] if prev else None))
        state.append_history(root, contracts.HistoryEvent(
            model=MODEL, action="promoted", version=out["version"], previous_champion=out["previous_champion"],
            champion=out["champion"], reason="test"))
    assert registry.get_champion(c, MODEL)["version"] == "3"
    return base


def _setup(tmp_path, template, *, serving: str, images=("img:1", "img:2", "img:3")):
    """A copy of the template registry; the port serves ``serving``."""
    import shutil

    shutil.copy(template / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copytree(template / "artifacts", tmp_path / "artifacts")
    c = _client(tmp_path)
    root = tmp_path / "artifacts"
    assert registry.get_champion(c, MODEL)["version"] == "3"
    world = World(set(images))
    FakeDeployer(world, root).deploy(f"img:{serving}", registry_version=serving)
    return c, root, world


def _rollback(c, root, deployer, **kw):
    return champion.change_champion(c, model_name=MODEL, artifact_root=root, version="previous",
                                    action="rolled_back", reason="the nightly model misbehaves", actor="ops",
                                    deployer=deployer, dag_id="rollback_model", **kw)


def _assert_converged(c, world):
    champ = registry.get_champion(c, MODEL)["version"]
    assert world.serving() == champ, (world.serving(), champ)
    assert world.state["container"] == world.upstream
    assert list(world.containers) == [world.upstream], world.containers  # no orphaned container
    assert world.overlaps == 0
    return champ


# --------------------------------------------------------------------------- the race


#: (what serves when both start, who reaches the point first, the point) — every point
#: each writer passes in that set-up
INTERLEAVINGS = [
    ("2", "deploy", "champion_read"), ("2", "deploy", "green_started"), ("2", "deploy", "before_switch"),
    ("2", "deploy", "before_record"),
    ("2", "rollback", "target_resolved"), ("2", "rollback", "alias_moved"),
    ("3", "rollback", "target_resolved"), ("3", "rollback", "green_started"), ("3", "rollback", "before_switch"),
    ("3", "rollback", "before_record"), ("3", "rollback", "alias_moved"),
    ("3", "deploy", "champion_read"),
]


@pytest.mark.parametrize("serving,first,point", INTERLEAVINGS)
def test_rollback_and_nightly_deploy_race_ends_serving_the_registry_champion(tmp_path, template, serving, first,
                                                                             point):
    """The nightly run promoted v3 (champion = 3) and its deploy starts while a person rolls
    back to ``previous``. When the first writer reaches ``point``, the second starts and must
    wait on the lock; either order ends with the port serving exactly the registry's champion
    (v2: the rollback's), the recorded state naming it, and no other container."""
    c, root, world = _setup(tmp_path, template, serving=serving)
    errors: list[BaseException] = []
    second_waits, second_done = threading.Event(), threading.Event()
    results: dict[str, dict] = {}

    def second_hook(p):
        if p == "lock_wait":
            second_waits.set()

    def run_second():
        try:
            c2 = _client(tmp_path)
            if first == "deploy":
                results["rollback"] = _rollback(c2, root, FakeDeployer(world, root), run_id="r2", hook=second_hook)
            else:
                results["deploy"] = champion.reconcile(c2, FakeDeployer(world, root), reason="nightly",
                                                       hook=second_hook)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            second_done.set()

    second = threading.Thread(target=run_second)

    def first_hook(p):
        if p == point and not second.is_alive() and not second_done.is_set():
            second.start()
            deadline = time.monotonic() + 20
            while not (second_waits.is_set() or second_done.is_set()) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert not second_done.is_set() or errors, \
                f"the second writer ran to the end while the first was at {point}: nothing serialised them"

    if first == "deploy":
        deployer = FakeDeployer(world, root, hook=first_hook)
        results["deploy"] = champion.reconcile(c, deployer, reason="nightly", hook=first_hook)
    else:
        deployer = FakeDeployer(world, root, hook=first_hook)
        results["rollback"] = _rollback(c, root, deployer, run_id="r1", hook=first_hook)
    assert second.ident is not None, f"the first writer never passed {point}"
    second.join(30)
    assert not errors, errors
    assert second_waits.is_set()  # the second writer waited for the lock
    assert _assert_converged(c, world) == "2"
    assert results["rollback"]["champion"] == "2" and results["rollback"]["previous_champion"] == "3"


def test_rollback_and_deploy_started_together_converge(tmp_path, template):
    """No forced order: both threads released at once, ten times over on one registry."""
    c, root, world = _setup(tmp_path, template, serving="2")
    for i in range(10):
        gate = threading.Barrier(2)
        errors = []

        def deploy():
            try:
                gate.wait()
                champion.reconcile(_client(tmp_path), FakeDeployer(world, root), reason="nightly")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        def force():
            try:
                gate.wait()
                champion.change_champion(_client(tmp_path), model_name=MODEL, artifact_root=root,
                                         version=str(3 - i % 2), action="forced", reason="flip", actor="ops",
                                         deployer=FakeDeployer(world, root), run_id=f"f{i}")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=deploy), threading.Thread(target=force)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert _assert_converged(c, world) == str(3 - i % 2)


def test_reconcile_after_a_rollback_and_twice_converges(tmp_path, template):
    c, root, world = _setup(tmp_path, template, serving="3")
    _rollback(c, root, FakeDeployer(world, root), run_id="r1")
    assert _assert_converged(c, world) == "2"
    before = dict(world.state)
    for _ in range(2):  # the nightly deploy that recorded v3 runs late: it serves the champion now
        out = champion.reconcile(c, FakeDeployer(world, root), reason="nightly")
        assert out["changed"] is False and out["version"] == "2"
    assert world.state == before and _assert_converged(c, world) == "2"


# --------------------------------------------------------------------------- rollback always moves


def test_repeated_rollback_never_restores_the_version_rolled_back_from(tmp_path, template):
    """previous, previous: 3 -> 2 -> 1, each serving; a third has nowhere to go and moves nothing."""
    c, root, world = _setup(tmp_path, template, serving="3")
    seen = []
    for i in (1, 2):
        out = _rollback(c, root, FakeDeployer(world, root), run_id=f"r{i}")
        assert out["moved"] and out["champion"] != out["previous_champion"]
        seen.append(_assert_converged(c, world))
    assert seen == ["2", "1"]
    history = list(state.read_jsonl(contracts.history_path(root, MODEL)))
    with pytest.raises(ConfigError, match="records no champion before v1"):
        _rollback(c, root, FakeDeployer(world, root), run_id="r3")
    assert _assert_converged(c, world) == "1"
    assert list(state.read_jsonl(contracts.history_path(root, MODEL))) == history  # nothing recorded


def test_rollback_after_forcing_the_champion_onto_itself_moves(tmp_path, template):
    """Item 3: promote_model on today's champion (a redeploy), then rollback ``previous``."""
    c, root, world = _setup(tmp_path, template, serving="3")
    forced = champion.change_champion(c, model_name=MODEL, artifact_root=root, version="3", action="forced",
                                      reason="redeploy the champion", actor="ops", deployer=FakeDeployer(world, root),
                                      run_id="p1")
    assert forced["moved"] is False and forced["previous_champion"] == "3"
    out = _rollback(c, root, FakeDeployer(world, root), run_id="r1")
    assert out["champion"] == "2" and out["previous_champion"] == "3"
    assert _assert_converged(c, world) == "2"
    with pytest.raises(ConfigError, match=r"rollback target v2 is the current champion of m \(v2\)"):
        champion.change_champion(c, model_name=MODEL, artifact_root=root, version="v2", action="rolled_back",
                                 reason="again", actor="ops", deployer=FakeDeployer(world, root), run_id="r2")


def test_a_retried_rollback_does_not_roll_back_twice(tmp_path, template):
    c, root, world = _setup(tmp_path, template, serving="3")
    _rollback(c, root, FakeDeployer(world, root), run_id="r1")
    again = _rollback(c, root, FakeDeployer(world, root), run_id="r1")  # the same run's retry
    assert again["moved"] is False and again["champion"] == "2"
    assert _assert_converged(c, world) == "2"
    assert [e["action"] for e in state.read_jsonl(contracts.history_path(root, MODEL))].count("rolled_back") == 1


class _Died(BaseException):
    """The task process dying at a hook point (nothing after it runs)."""


@pytest.mark.parametrize("action", ["rolled_back", "forced"])
def test_a_retry_after_dying_between_the_alias_move_and_the_history_line_moves_once(tmp_path, template, action):
    """The first try moved champion 3 -> 2 and died before append_history; its retry (same
    run) must find its own move on v2 (not roll back again to v1) and write the one history line."""
    c, root, world = _setup(tmp_path, template, serving="3")

    def die(p):
        if p == "alias_moved":
            raise _Died()

    def move(hook=None):
        if action == "rolled_back":
            return _rollback(c, root, FakeDeployer(world, root), run_id="r1", hook=hook)
        return champion.change_champion(c, model_name=MODEL, artifact_root=root, version="2", action="forced",
                                        reason="the nightly model misbehaves", actor="ops", dag_id="promote_model",
                                        deployer=FakeDeployer(world, root), run_id="r1", hook=hook)

    with pytest.raises(_Died):
        move(hook=die)
    assert registry.get_champion(c, MODEL)["version"] == "2"  # moved, but not recorded
    assert [e["action"] for e in state.read_jsonl(contracts.history_path(root, MODEL))].count(action) == 0
    again = move()  # the same run's retry
    assert again["moved"] is False and again["champion"] == "2" and again["previous_champion"] == "3"
    assert _assert_converged(c, world) == "2"
    events = [e for e in state.read_jsonl(contracts.history_path(root, MODEL)) if e["action"] == action]
    assert len(events) == 1
    assert events[0]["champion"] == "2" and events[0]["previous_champion"] == "3" and events[0]["run_id"] == "r1"
    assert c.get_model_version(MODEL, "2").tags[f"nightshift.{action}_from"] == "3"
    move()  # a third try: still nothing moves, nothing more is recorded
    assert registry.get_champion(c, MODEL)["version"] == "2"
    assert [e["action"] for e in state.read_jsonl(contracts.history_path(root, MODEL))].count(action) == 1
    # another run's rollback is not mistaken for this one's retry: it moves on (2 -> 1)
    if action == "rolled_back":
        assert _rollback(c, root, FakeDeployer(world, root), run_id="r2")["champion"] == "1"


def test_a_move_that_fails_leaves_no_mark_of_this_run(tmp_path, template, monkeypatch):
    """The alias did not move (compare-and-set refused): the target carries no mark claiming it did."""
    c, root, world = _setup(tmp_path, template, serving="3")

    def refuse(*_a, **_k):
        raise registry.ChampionMoved("moved meanwhile")

    monkeypatch.setattr(registry, "set_champion", refuse)
    with pytest.raises(registry.ChampionMoved):
        _rollback(c, root, FakeDeployer(world, root), run_id="r1")
    assert champion.run_tag("rolled_back") not in c.get_model_version(MODEL, "2").tags
    assert _assert_converged(c, world) == "3"


# --------------------------------------------------------------------------- deployable before the alias moves


def test_a_target_whose_image_is_gone_moves_nothing(tmp_path, template):
    """Item 11: retention removed v2's image; rollback and promote_model refuse before the alias moves."""
    c, root, world = _setup(tmp_path, template, serving="3", images=("img:1", "img:3"))
    history = list(state.read_jsonl(contracts.history_path(root, MODEL)))
    with pytest.raises(ConfigError, match=r"image of m v2, img:2, is not in the local Docker daemon"):
        _rollback(c, root, FakeDeployer(world, root), run_id="r1")
    with pytest.raises(ConfigError, match="img:2"):
        champion.change_champion(c, model_name=MODEL, artifact_root=root, version="2", action="forced",
                                 reason="try it", actor="ops", deployer=FakeDeployer(world, root), run_id="p1")
    assert registry.get_champion(c, MODEL)["version"] == "3"
    assert _assert_converged(c, world) == "3"
    assert list(state.read_jsonl(contracts.history_path(root, MODEL))) == history


def test_a_target_that_does_not_become_ready_moves_nothing(tmp_path, template):
    c, root, world = _setup(tmp_path, template, serving="3")
    with pytest.raises(ServingError, match="was not ready"):
        _rollback(c, root, FakeDeployer(world, root, fail=True), run_id="r1")
    assert registry.get_champion(c, MODEL)["version"] == "3"
    assert _assert_converged(c, world) == "3"
    assert "nightshift.rolled_back_by" not in c.get_model_version(MODEL, "2").tags


def test_a_target_without_its_digest_or_version_moves_nothing(tmp_path, template):
    c, root, world = _setup(tmp_path, template, serving="3")
    c.delete_model_version_tag(MODEL, "1", "nightshift.onnx_sha256")
    with pytest.raises(ConfigError, match="m v1 has no nightshift.onnx_sha256 tag"):
        champion.change_champion(c, model_name=MODEL, artifact_root=root, version="1", action="forced",
                                 reason="try it", actor="ops", deploy="none", run_id="p1")
    with pytest.raises(ConfigError, match="m has no version 9"):
        champion.change_champion(c, model_name=MODEL, artifact_root=root, version="9", action="forced",
                                 reason="try it", actor="ops", deploy="kubernetes", run_id="p2")
    assert registry.get_champion(c, MODEL)["version"] == "3"


# --------------------------------------------------------------------------- the lock itself


def test_the_lock_excludes_other_threads_and_is_reentrant(tmp_path):
    order = []
    with champion.champion_lock(tmp_path, MODEL) as path:
        with champion.champion_lock(tmp_path, MODEL, timeout_s=0.1):  # same thread: no deadlock
            order.append("inner")
        waited = threading.Event()

        def other():
            with champion.champion_lock(tmp_path, MODEL, timeout_s=10, on_wait=waited.set):
                order.append("other")

        t = threading.Thread(target=other)
        t.start()
        assert waited.wait(60)  # the other thread reached the lock and waits (60 s: a hang)
        order.append("outer-end")
    t.join(10)
    assert order == ["inner", "outer-end", "other"]
    assert path == champion.lock_path(tmp_path, MODEL)
    assert champion.lock_path(tmp_path, "a/b") != champion.lock_path(tmp_path, "a_b")  # names stay apart


def test_a_lock_held_by_a_sigkilled_process_is_released(tmp_path):
    code = ("import sys, time\nfrom nightshift.champion import champion_lock\n"
            "with champion_lock(sys.argv[1], 'm', purpose='holder under test'):\n"
            "    print('locked', flush=True)\n    time.sleep(120)\n")
    plugins = str(Path(champion.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": plugins + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(champion.ChampionLockTimeout, match=rf"held by pid {child.pid} .*holder under test"):
            with champion.champion_lock(tmp_path, MODEL, timeout_s=0.3):
                pass
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        # released by the kernel when the holder died: free at the first try (timeout 0: one
        # attempt), no stale-lock timeout to wait out
        with champion.champion_lock(tmp_path, MODEL, timeout_s=0):
            pass
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


# --------------------------------------------------------------------------- the lock on an object store


@pytest.fixture
def s3_pair(s3_server, s3_root, tmp_path):
    """Two workers' stores on one s3 root (different working copies): they share no folder."""
    from nightshift.store import open_store

    return (open_store(s3_root, cache_dir=tmp_path / "worker-a", s3=s3_server.options()),
            open_store(s3_root, cache_dir=tmp_path / "worker-b", s3=s3_server.options()))


def test_the_lock_excludes_across_workers_that_share_no_folder(s3_pair):
    a, b = s3_pair
    held, release, order = threading.Event(), threading.Event(), []

    def holder():
        with champion.champion_lock(a, MODEL, purpose="deploy on worker a") as uri:
            order.append(uri)
            with champion.champion_lock(a, MODEL, timeout_s=0.1):  # reentrant on the object store too
                held.set()
                release.wait(20)
            order.append("a-end")

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(20)
    try:
        with pytest.raises(champion.ChampionLockTimeout, match=r"champion lock of 'm' \(s3://.*/locks/champion/m.lock\)"
                                                               r" is held by pid \d+ .*deploy on worker a"):
            with champion.champion_lock(b, MODEL, timeout_s=0.5):
                pass
        waited = threading.Event()
        threading.Timer(0.5, release.set).start()
        with champion.champion_lock(b, MODEL, timeout_s=20, on_wait=waited.set):
            order.append("b")
        assert waited.is_set()
    finally:
        release.set()
        t.join(20)
    assert order == [f"{a.uri}/locks/champion/m.lock", "a-end", "b"]


def test_a_dead_holders_lease_expires_and_a_waiter_takes_over(s3_pair, s3_server, monkeypatch):
    """A holder killed without releasing leaves its lease object; once its ``expires`` passed,
    a waiter on another worker takes the lock over (a lease not yet expired still excludes)."""
    import json as _json

    from nightshift.store import S3Store

    a, b = s3_pair
    monkeypatch.setattr(S3Store, "LEASE_S", 1.0)
    key = a.key(champion.lock_rel(MODEL))

    def dead_holder(expires):
        s3_server.client().put_object(Bucket=a.bucket, Key=key, Body=_json.dumps(
            {"token": "dead", "pid": 999999, "host": "gone", "purpose": "killed deploy", "since": "earlier",
             "expires": expires}).encode())

    def lease() -> dict:
        return _json.loads(s3_server.client().get_object(Bucket=a.bucket, Key=key)["Body"].read())

    dead_holder(time.time() + 60)  # alive as far as anyone can tell
    with pytest.raises(champion.ChampionLockTimeout, match="pid 999999 on gone .*killed deploy"):
        with champion.champion_lock(b, MODEL, timeout_s=0.5):
            pass
    dead_holder(time.time() - 5)  # its lease ran out: the holder died
    with champion.champion_lock(b, MODEL, timeout_s=10, purpose="the waiter"):  # taken over (10 s bounds a hang)
        first = lease()
        assert first["purpose"] == "the waiter" and first["token"] != "dead"
        # the live holder renews its lease (every LEASE_S / 3): wait for a renewal instead of
        # sleeping past LEASE_S, so a slow machine changes how long this takes, not the outcome
        deadline = time.monotonic() + 20
        while lease()["expires"] == first["expires"]:
            assert time.monotonic() < deadline, "the holder never renewed its lease"
            time.sleep(0.05)
        assert lease()["token"] == first["token"]  # renewed by its holder, not taken over
        refused = []

        def other_worker():  # another thread: this one's reentrancy does not apply
            try:
                with champion.champion_lock(a, MODEL, timeout_s=0.5):
                    refused.append(False)
            except champion.ChampionLockTimeout:
                refused.append(True)

        t = threading.Thread(target=other_worker)
        t.start()
        t.join(20)
        assert refused == [True]
    with champion.champion_lock(a, MODEL, timeout_s=5):  # released: free at once
        pass
