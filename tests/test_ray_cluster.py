"""A local two-node Ray cluster (a head and one worker node of 1 CPU each, on this machine, on the
loopback interface only): extraction and batch captioning through `--ray-address` give the local
engine's outputs; a worker killed during a run loses and duplicates nothing; a driver killed
midway resumes without redoing finished parts. Slow (about two to four minutes on 2 shared
cores); skipped without ray.

The cluster is started with `ray start ... --block` in process groups of its own and stopped by
signalling those groups (and any process left holding the cluster's temp dir), never by
`ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from model_dirs import make_model_dir
from test_inference import convert_tiny_tflite

from captioner.data import feature_files
from captioner.data.demo import write_demo_shards
from captioner.engines import parts as parts_lib
from captioner.engines.runner import TEST_DELAY_VARIABLE
from captioner.layout import features_parts_dir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
IMAGES = 300
CAPTIONS = ["a red circle on the left", "a blue square at the top", "a green triangle in the middle"]


# Every node on 127.0.0.2: Ray turns "127.0.0.1" into the machine's network address, any other
# loopback address it keeps, so all of the cluster's traffic stays on the loopback interface.
HOST = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def cluster_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["RAY_AUTH_MODE"] = "disabled"  # a loopback-only test cluster: no token to hand around
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


def _pids_using(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
    return found


def _stop_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@pytest.fixture(scope="module")
def cluster():
    """{"address": "127.0.0.2:PORT", "temp": DIR, "env": ...} of a running head + worker node; stopped after."""
    pytest.importorskip("ray")  # here, not at import: the fast suite collects this file without loading Ray
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    port = free_port()
    address = f"{HOST}:{port}"
    env = cluster_env(**{TEST_DELAY_VARIABLE: "0.3"})  # actors pause before each block: a kill lands mid-run
    common = ["--num-cpus", "1", "--node-ip-address", HOST, "--disable-usage-stats", "--block"]
    started: list[subprocess.Popen] = []
    try:
        head = subprocess.Popen([RAY, "start", "--head", "--port", str(port), "--temp-dir", str(temp),
                                 "--include-dashboard", "false", *common], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=open(temp / "head.log", "wb"))
        started.append(head)
        _wait_for_nodes(address, 1, head)
        node = subprocess.Popen([RAY, "start", "--address", address, *common], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=open(temp / "node.log", "wb"))
        started.append(node)
        _wait_for_nodes(address, 2, node)
        yield {"address": address, "temp": temp, "env": cluster_env()}
    finally:
        for process in reversed(started):
            _stop_group(process)
        for pid in _pids_using(str(temp)):  # anything of this cluster that left its group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(address: str, count: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    program = (
        "import ray, sys; ray.init(address=sys.argv[1], _node_ip_address=sys.argv[1].split(':')[0], "
        "logging_level='ERROR'); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        result = subprocess.run([sys.executable, "-c", program, address], env=cluster_env(), capture_output=True,
                                text=True, timeout=60)
        if result.returncode == 0 and int(result.stdout.strip().splitlines()[-1]) >= count:
            return
        time.sleep(2)
    raise RuntimeError(f"the Ray cluster at {address} did not reach {count} nodes")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-inputs")
    write_demo_shards(root / "shards", IMAGES, per_shard=100)
    backbone = convert_tiny_tflite(root / "tiny.tflite")
    return {"root": root, "shards": root / "shards", "backbone": backbone}


def captioner(args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "captioner.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "captioner.cli", *args], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def extract_args(inputs, output: Path, *more: str) -> list[str]:
    return ["extract", "--images", str(inputs["shards"]), "--output", str(output), "--backbone", "mobilenet_v2",
            "--weights", str(inputs["backbone"]), "--engine.block_size=20", *more]


def same_features(a: Path, b: Path) -> None:
    x, y = feature_files.load_features_file(a), feature_files.load_features_file(b)
    assert sorted(x) == sorted(y) and len(x) == IMAGES
    assert all(np.array_equal(x[key], y[key]) for key in x)


def _done_parts(output: Path) -> int:
    path = features_parts_dir(output) / parts_lib.DONE_FILE
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_a_two_node_cluster_extracts_and_captions_as_the_local_engine_and_survives_kills(cluster, inputs, tmp_path):
    env, address = cluster["env"], cluster["address"]
    local = tmp_path / "local.pkl"
    run(extract_args(inputs, local), env)

    # Extraction through the cluster: both nodes' actors, the same features, whether the actors
    # decode their blocks (the default) or Ray tasks hand them decoded blocks.
    for decode_in in ("actors", "tasks"):
        on_cluster = tmp_path / f"cluster-{decode_in}.pkl"
        result = run(extract_args(inputs, on_cluster, "--engine", "ray", "--ray-address", address,
                                  "--engine.workers=2", f"--engine.decode_in={decode_in}"), env)
        assert "engine ray" in result.stdout and "15 parts run" in result.stdout
        same_features(local, on_cluster)

    # A worker (an actor process) killed during the run: Ray restarts it and retries its block.
    killed = tmp_path / "killed.pkl"
    driver = captioner(extract_args(inputs, killed, "--engine", "ray", "--ray-address", address,
                                    "--engine.workers=2"), env)
    victim = None
    deadline = time.monotonic() + 180
    while victim is None and time.monotonic() < deadline and driver.poll() is None:
        if _done_parts(killed) >= 1:
            actors = [pid for pid in _pids_using("_PartActor") if pid != driver.pid]
            if actors:
                victim = actors[0]
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
    out, err = driver.communicate(timeout=300)
    assert victim is not None, "the run ended before a worker could be killed"
    assert driver.returncode == 0, err[-3000:]
    same_features(local, killed)

    # The driver killed midway: a rerun resumes from the recorded parts.
    resumed = tmp_path / "resumed.pkl"
    driver = captioner(extract_args(inputs, resumed, "--engine", "ray", "--ray-address", address,
                                    "--engine.workers=2"), env, start_new_session=True)
    deadline = time.monotonic() + 180
    while _done_parts(resumed) < 3 and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(30)
    finished = _done_parts(resumed)
    assert 3 <= finished < 15 and not resumed.exists()
    result = run(extract_args(inputs, resumed, "--engine", "ray", "--ray-address", address, "--engine.workers=2"), env)
    assert f"{15 - finished} parts run, {finished} resumed" in result.stdout
    same_features(local, resumed)

    # Batch captioning through the cluster: the local engine's rows.
    model = make_model_dir(tmp_path / "model", CAPTIONS, feature_files.feature_provenance(local), 8)
    rows = {}
    for engine, more in (("local", []), ("ray", ["--engine", "ray", "--ray-address", address,
                                                  "--engine.workers=2"])):
        output = tmp_path / f"captions-{engine}.parquet"
        run(["caption-batch", str(inputs["shards"]), "--model", str(model), "--output", str(output),
             "--engine.block_size=20", *more], env)
        rows[engine] = parts_lib.read_captions_file(output)
    assert len(rows["local"]) == IMAGES and rows["ray"] == rows["local"]
