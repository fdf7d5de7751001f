"""Running blocks: in this process (`run_local`), or as a Ray Data pipeline (`run_ray`).

Both take the blocks still to do, a `Job` (how to decode a block, how to build the worker that
turns a decoded block into a part file), and `on_part(summary)`, called in the driver as each
part is finished (it records the part in done.jsonl). Results never travel back whole: a
worker writes its part beside the output and returns a one-line summary.

`run_ray` builds: `ray.data.from_items(blocks)` (one block per Ray block) -> with
`decode_in="tasks"`, `map_batches(decode task)` (read + decode + resize, Ray tasks declaring no
CPU, so that they run beside the actors; at most 2 per actor in flight) -> `map_batches(_PartActor,
ActorPoolStrategy(workers), num_cpus=cpus_per_worker)` (a stateful callable class over an actor
pool: the backbone, and the decoder, built once per actor; with `decode_in="actors"`, the
default, it reads and decodes its block itself; Ray restarts a killed actor and retries its
block, whose part is then written again, the same file) -> `iter_rows()` in the driver. Handing a
decoded block (38 MB) from a task to an actor cost more CPU than decoding it (results/ray.md). The driver connects to `engine.ray_address` (or $RAY_ADDRESS),
else starts Ray on this machine with `workers x cpus_per_worker` CPUs (all cores when workers is
0) and an object store sized to the decoded blocks in flight (at least 512 MB; with Ray's default,
30% of the memory, the workers' RSS grew with the run as they mapped more of its pages). Ray is imported only here, only when asked for; without it: one line saying how to install.
A cluster address that does not answer is one line (checked with a TCP connect first, 10 s).
Every node needs captioner installed (same version) and the inputs and the output's folder at
the same paths (a shared file system); docs/scale.md says how to run it on a cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from captioner.data.sources import Block
from captioner.engines.parts import PartSummary
from captioner.engines.work import (
    CaptionWorker,
    DecodedBlock,
    FeatureWorker,
    decode_block,
)
from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'captioner[ray]'"
CONNECT_TIMEOUT_S = 10.0
DECODE_TASKS_PER_WORKER = 2  # decoded blocks in flight per actor: enough to keep it busy, 38 MB each
MIN_OBJECT_STORE_BYTES = 512 << 20  # a Ray started here: never a smaller object store than this
# Read by Ray when imported: "0" makes a Ray started here use 127.0.0.1 as its node address.
LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Tests only: seconds an actor waits before each block, so that a test can kill a worker mid-run.
TEST_DELAY_VARIABLE = "CAPTIONER_TEST_BLOCK_DELAY_S"


@dataclass
class Job:
    """What to do with each block. kind: "features" | "captions"; size, resample: how images are
    decoded; worker_kwargs: FeatureWorker's or CaptionWorker's constructor arguments; folder: the parts folder."""

    kind: str
    size: tuple[int, int]
    resample: str
    image_column: str
    folder: str
    worker_kwargs: dict[str, Any] = field(default_factory=dict)

    def make_worker(self) -> Any:
        return FeatureWorker(**self.worker_kwargs) if self.kind == "features" else CaptionWorker(**self.worker_kwargs)

    def decode(self, block: Block) -> DecodedBlock:
        """The block's images read and decoded at this job's size (`decode_block`), wherever it runs."""
        return decode_block(block, self.size, self.resample, self.image_column)


def run_local(blocks: list[Block], job: Job, on_part: Callable[[PartSummary], None], worker: Any = None) -> None:
    """Each block in turn, in this process: decode, then the worker (built once, or `worker`)."""
    if not blocks:
        return
    worker = worker if worker is not None else job.make_worker()
    for block in blocks:
        on_part(worker.run(job.decode(block), job.folder))


# --------------------------------------------------------------------------- Ray


def import_ray(address: str = "") -> Any:
    """`ray` with Ray Data, or one line saying how to install it. With no cluster address, Ray is
    told to keep to the loopback interface (a Ray of this machine only: nothing listens outside)."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault(LOOPBACK_VARIABLE, "0")
    try:
        import ray
        import ray.data  # noqa: F401  (the extra: ray[data] brings pyarrow and pandas)
    except ImportError:
        raise CaptionerError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A host:port cluster address that does not accept a connection: one line (Ray itself would retry for minutes)."""
    if not address or address == "auto" or "://" in address:
        return
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        raise CaptionerError(f"bad Ray address {address!r} (engine.ray_address / --ray-address): expected HOST:PORT")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise CaptionerError(f"cannot reach the Ray cluster at {address} ({reason}); is `ray start --head` running there?") from None


def preflight(engine: Any) -> None:
    """Before any work: with engine ray, Ray must be installed and the cluster address answer (one line each)."""
    if engine.name == "ray":
        import_ray(engine.ray_address)
        check_reachable(engine.ray_address or os.environ.get("RAY_ADDRESS", ""))


@contextlib.contextmanager
def ray_session(address: str, cpus: int, object_store_bytes: int = 0) -> Any:
    """Connected to a cluster (address), or to a Ray started here with `cpus` CPUs and an object
    store of `object_store_bytes` (0: Ray's default, 30% of the memory); shut down after."""
    ray = import_ray(address)
    address = address or os.environ.get("RAY_ADDRESS", "")
    check_reachable(address)
    # Ray's own notices (token authentication, progress bars, execution plans) stay off stderr; the
    # workers' lines (a skipped image, an error) still come through (log_to_driver).
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address:
                host = address.rpartition(":")[0]
                # A cluster on this machine's loopback (127.x, as the tests start one): this driver is on it too.
                local = {"_node_ip_address": host} if host.startswith("127.") else {}
                ray.init(address=address, **quiet, **local)
            else:
                store = {"object_store_memory": object_store_bytes} if object_store_bytes else {}
                ray.init(num_cpus=cpus, **quiet, **store)
        except (ConnectionError, RuntimeError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CaptionerError(f"cannot start or join Ray{f' at {address}' if address else ''}: {first}") from None
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def _decode_batch(batch: dict[str, Any], job: Job) -> dict[str, Any]:
    """Ray task: one block (its JSON) -> its decoded bytes."""
    import numpy as np

    block = Block.from_json(str(batch["block"][0]))
    decoded = job.decode(block)
    return {"decoded": np.array([decoded.to_bytes()], dtype=object)}


class _PartActor:
    """Ray actor: a worker (backbone, or Captioner) built once; each block -> its part file. A batch
    holds decoded blocks ("decoded", from the decode tasks) or blocks to read and decode here ("block")."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.worker = job.make_worker()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import time

        import numpy as np

        time.sleep(float(os.environ.get(TEST_DELAY_VARIABLE, "0") or 0))
        job = self.job
        if "decoded" in batch:
            decoded = [DecodedBlock.from_bytes(bytes(data)) for data in batch["decoded"]]
        else:
            decoded = [job.decode(Block.from_json(str(text))) for text in batch["block"]]
        summaries = [self.worker.run(block, job.folder) for block in decoded]
        return {"summary": np.array([s.to_json() for s in summaries], dtype=object)}


def _user_error(error: BaseException) -> CaptionerError | None:
    """The CaptionerError inside a Ray exception chain (a worker's one-line error), if any."""
    seen = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, CaptionerError):
            return current
        stack.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    return None


def run_ray(blocks: list[Block], job: Job, on_part: Callable[[PartSummary], None], *, address: str = "",
            workers: int = 0, cpus_per_worker: int = 1, decode_in: str = "actors") -> None:
    """The blocks as a Ray Data pipeline (see the module docstring); `on_part` in the driver, per part."""
    local_cpus = (workers * cpus_per_worker) if workers else (os.cpu_count() or 1)
    # A Ray started here gets a store sized to what is in flight (decoded blocks, 2 per actor, room
    # for each twice), not 30% of the machine: workers map its pages, and their RSS grows with them.
    largest = max((block.count for block in blocks), default=1)
    block_bytes = largest * job.size[0] * job.size[1] * 3
    actors = max(1, local_cpus // cpus_per_worker)
    store = max(MIN_OBJECT_STORE_BYTES, 4 * DECODE_TASKS_PER_WORKER * block_bytes * actors)
    with ray_session(address, local_cpus, store) as ray:
        if not blocks:
            return
        if not workers:
            total = int(ray.cluster_resources().get("CPU", 1))
            workers = max(1, total // cpus_per_worker)
        log.info("ray: %d blocks on %d workers of %d CPU (cluster: %s)", len(blocks), workers, cpus_per_worker,
                 ray.cluster_resources().get("CPU"))
        dataset = ray.data.from_items([{"block": block.to_json()} for block in blocks], override_num_blocks=len(blocks))
        if decode_in == "tasks":
            dataset = dataset.map_batches(
                _decode_batch, batch_size=1, num_cpus=0,
                compute=ray.data.TaskPoolStrategy(size=DECODE_TASKS_PER_WORKER * workers),
                fn_kwargs={"job": job},
            )
        dataset = dataset.map_batches(
            _PartActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
            fn_constructor_kwargs={"job": job},
        )
        try:
            for row in dataset.iter_rows():
                on_part(PartSummary(**json.loads(row["summary"])))
        except CaptionerError:
            raise
        except Exception as error:  # Ray wraps a worker's exception in its own types
            found = _user_error(error)
            if found is not None:
                raise CaptionerError(str(found)) from None
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CaptionerError(f"the Ray run failed: {first}") from None

