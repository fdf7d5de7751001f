"""Training under tf.distribute, each in fresh processes (device setup must precede TensorFlow's start).

- mirrored: one process whose CPU is split into two logical devices, so MirroredStrategy
  really runs two replicas.
- multiworker: two local worker processes (bench/multiworker.py); 30-90 s on 2 cores, so it
  runs only with CAPTIONER_MULTIWORKER_TEST=1.

Both start TensorFlow afresh (tens of seconds): marked slow (`make test-slow`, CI). The tiny
data set is bench/multiworker.py's `make_tiny_data`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MIRRORED = textwrap.dedent(
    """
    import json, logging, sys
    from pathlib import Path
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[2])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from multiworker import make_tiny_data
    from captioner import config as config_lib
    from captioner.stages.training import train_stage
    root = Path(sys.argv[1])
    features, captions = make_tiny_data(root)
    config = config_lib.apply_overrides(config_lib.Config(), [
        f"--train.features={features}", f"--train.captions={captions}", f"--train.output={root / 'model'}",
        "--train.epochs=2", "--train.patience=0", "--train.batch_size=8", "--train.learning_rate=0.01",
        "--train.strategy=mirrored", "--model.embedding_dim=8", "--model.units=16",
    ])
    result = train_stage(config)
    print(json.dumps({"epochs": result.epochs_done, "best": result.best_val_loss,
                      "devices": len(tf.config.list_logical_devices("CPU"))}))
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_mirrored_strategy_trains_on_two_logical_cpus(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(tmp_path), str(ROOT / "bench")],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2 and report["epochs"] == 2 and report["best"] > 0
    assert "MirroredStrategy with 2 replicas" in done.stderr
    assert (tmp_path / "model" / "model.keras").is_file()
    assert json.loads((tmp_path / "model" / "config.json").read_text())["config"]["train"]["strategy"] == "mirrored"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CAPTIONER_MULTIWORKER_TEST") != "1", reason="set CAPTIONER_MULTIWORKER_TEST=1")
def test_two_local_workers_train_one_model(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "multiworker.py"), "--keep", str(tmp_path), "--timeout", "240"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    chief, other = (line for line in done.stdout.splitlines() if line.startswith("worker "))
    assert "written by the chief worker" in other and "written by" not in chief
    assert (tmp_path / "model" / "model.keras").is_file() and (tmp_path / "model" / "manifest.json").is_file()
