#!/usr/bin/env python3
"""Benchmark: extraction on the Ray engine against the local engine, and memory as images grow. One run.

Inputs: demo scenes (`captioner.data.demo.write_demo_shards`) as WebDataset shards of --per-shard
images, written once into --workdir; a size N reads the first N / per-shard shards. The backbone
is the shared int8 MobileNetV2 (--weights; LiteRT, 1280-d), as on the real Flickr8k path.

Rows (each a `captioner extract` process on the same shards, timed by the engine's own line
"N images through the ... engine in S s", which counts from the first block to the last part,
actor start-up included; the whole command's wall time is beside it):

- speed, at --speed-size images:
    local-1core   `--engine local --features.workers=1`, pinned to one core (taskset -c 0)
    ray-1worker   `--engine ray --engine.workers=1` (a Ray started here with 1 CPU), pinned to one core
    ray-2workers  `--engine ray --engine.workers=2` (2 CPUs), on cores 0 and 1
    ray-1worker-tasks, ray-2workers-tasks   the same with `--engine.decode_in=tasks`
  (the ray rows decode in the actors, the default, unless named -tasks),
  with the goals: ray-1worker >= 0.85 x local-1core; ray-2workers >= 1.8 x ray-1worker. Each row
  also sums the CPU seconds of all its processes (sampled every 0.5 s: a floor).
- memory, at each of --sizes: ray-2workers, with the peak RSS (VmHWM, sampled every 0.5 s) and
  in brackets the peak private memory (RssAnon) of the driver, of each actor process (max), of
  each decode-task worker (max), and of Ray's raylet and GCS binaries (summed): flat means
  the same at 10k as at 100k. A Ray worker's RSS counts the object-store pages it maps (shared).

Usage (from the repository root):

    python bench/ray_scale.py --sizes 10000,50000,100000 --speed-size 10000     # the full sizes
    python bench/ray_scale.py --sizes 2000,10000,20000 --speed-size 2000        # what 2 shared cores allow

Cost: ~50 images/s per core with the int8 MobileNetV2, so the full sizes take about
(10k + 50k + 100k) / 100 s = 27 minutes of extraction on 2 cores, plus ~5 ms per image to write the shards.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_TFLITE = ROOT.parent / "shared" / "backbones" / "mobilenet_v2_imagenet_int8.tflite"
RATE_LINE = re.compile(r"(\d+) images through the (\w+) engine in ([\d.]+) s")
STEADY = re.compile(r"([\d.]+) images/s after the first part")


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        for child in children.get(pid, []):
            found.append(child)
            stack.append(child)
    return found


class PeakRss:
    """Samples a process tree every `interval` seconds, by role: the peak RSS (VmHWM, which counts
    the object-store pages a Ray worker maps: shared, bounded by the store) and the peak private
    memory (the largest RssAnon seen: what the process itself holds)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.peaks = {"driver": 0, "actor": 0, "task": 0, "ray": 0,
                      "driver_anon": 0, "actor_anon": 0, "task_anon": 0}
        self._ray_system: dict[int, int] = {}
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds when last seen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peaks["driver"] = max(self.peaks["driver"], _status_kb(self.pid, "VmHWM"))
            self.peaks["driver_anon"] = max(self.peaks["driver_anon"], _status_kb(self.pid, "RssAnon"))
            self._cpu[self.pid] = ("driver", _cpu_seconds(self.pid))
            for child in _descendants(self.pid):
                text, peak, anon = _cmdline(child), _status_kb(child, "VmHWM"), _status_kb(child, "RssAnon")
                role = "actor" if "_PartActor" in text else "task" if "ray::" in text else None
                if role is not None:
                    self.peaks[role] = max(self.peaks[role], peak)
                    self.peaks[role + "_anon"] = max(self.peaks[role + "_anon"], anon)
                elif Path(text.split(" ", 1)[0]).name in ("raylet", "gcs_server"):  # the binaries, not their agents
                    self._ray_system[child] = max(self._ray_system.get(child, 0), peak)
                seconds = _cpu_seconds(child)
                if seconds:
                    self._cpu[child] = (role or ("ray" if child in self._ray_system else "other"), seconds)
            self.peaks["ray"] = sum(self._ray_system.values())
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        cpu: dict[str, float] = {}
        for role, seconds in self._cpu.values():
            cpu[f"cpu_{role}"] = cpu.get(f"cpu_{role}", 0.0) + seconds
        return {**{role: kb / 1024 for role, kb in self.peaks.items()}, **cpu}


def run_extract(shards: list[Path], output: Path, weights: Path, engine: str, workers: int, cores: str,
                block_size: int, decode_in: str = "actors") -> dict[str, object]:
    args = ["taskset", "-c", cores, sys.executable, "-m", "captioner.cli", "extract", "--images",
            *map(str, shards), "--output", str(output), "--backbone", "mobilenet_v2", "--weights", str(weights),
            f"--engine.block_size={block_size}", "--force"]
    if engine == "ray":
        args += ["--engine", "ray", f"--engine.workers={workers}", f"--engine.decode_in={decode_in}"]
    else:
        args += ["--features.workers=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.monotonic()
    process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakRss(process.pid)
    out, err = process.communicate()
    wall = time.monotonic() - started
    peaks = sampler.stop()
    if process.returncode != 0:
        raise SystemExit(f"extract failed ({process.returncode}):\n{err[-3000:]}")
    match = RATE_LINE.search(err)
    images, seconds = (int(match.group(1)), float(match.group(3))) if match else (0, wall)
    steady = STEADY.search(err)
    output.unlink(missing_ok=True)
    return {"images": images, "seconds": seconds, "rate": images / seconds, "wall": wall,
            "steady": float(steady.group(1)) if steady else images / seconds, **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,10000,20000", help="images per memory row, comma-separated")
    parser.add_argument("--speed-size", type=int, default=2000, help="images for the three speed rows")
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--weights", type=Path, default=SHARED_TFLITE)
    parser.add_argument("--workdir", type=Path, default=ROOT / "data" / "bench-ray")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    from captioner.data.demo import write_demo_shards

    sizes = [int(s) for s in args.sizes.split(",") if s]
    largest = max(sizes + [args.speed_size])
    shard_dir = args.workdir / f"shards-{args.per_shard}"
    have = sorted(shard_dir.glob("*.tar"))
    needed = -(-largest // args.per_shard)
    if len(have) < needed:
        t0 = time.monotonic()
        write_demo_shards(shard_dir, needed * args.per_shard, seed=0, per_shard=args.per_shard)
        print(f"wrote {needed * args.per_shard} demo images as {needed} shards in {time.monotonic() - t0:.0f} s",
              file=sys.stderr)
    shards = sorted(shard_dir.glob("*.tar"))
    output = args.workdir / "features.pkl"

    def take(count: int) -> list[Path]:
        if count % args.per_shard:
            raise SystemExit(f"sizes must be multiples of --per-shard {args.per_shard}")
        return shards[: count // args.per_shard]

    print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; backbone {args.weights.name}; "
          f"block size {args.block_size}")
    if not args.skip_speed:
        rows = {}
        for name, engine, workers, cores, decode_in in (
                ("local-1core", "local", 1, "0", ""), ("ray-1worker", "ray", 1, "0", "actors"),
                ("ray-2workers", "ray", 2, "0,1", "actors"), ("ray-1worker-tasks", "ray", 1, "0", "tasks"),
                ("ray-2workers-tasks", "ray", 2, "0,1", "tasks")):
            rows[name] = run_extract(take(args.speed_size), output, args.weights, engine, workers, cores,
                                     args.block_size, decode_in)
            print(f"  {name}: {rows[name]}", file=sys.stderr)
        print(f"\n| {args.speed_size} images | images/s, first block to last | images/s after the first part "
              "| command wall s | CPU s (all processes) | driver peak MB | actor peak MB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, row in rows.items():
            cpu = sum(value for key, value in row.items() if key.startswith("cpu_"))
            print(f"| {name} | {row['rate']:.1f} | {row['steady']:.1f} | {row['wall']:.0f} | {cpu:.0f} | "
                  f"{row['driver']:.0f} | {row['actor']:.0f} |")
        for key, what in (("rate", "first block to last"), ("steady", "after the first part")):
            one, two, local = rows["ray-1worker"][key], rows["ray-2workers"][key], rows["local-1core"][key]
            tasks_one, tasks_two = rows["ray-1worker-tasks"][key], rows["ray-2workers-tasks"][key]
            print(f"\n{what}: ray-1worker / local-1core {one / local:.2f} (goal >= 0.85); "
                  f"ray-2workers / ray-1worker {two / one:.2f} (goal >= 1.8); decoding in tasks: "
                  f"{tasks_one / local:.2f} and {tasks_two / tasks_one:.2f}")
    print("\n| images (ray, 2 workers) | images/s | after the first part | driver peak MB (private) "
          "| actor peak MB (private) | decode worker peak MB (private) | raylet+GCS MB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in sizes:
        row = run_extract(take(size), output, args.weights, "ray", 2, "0,1", args.block_size)
        print(f"| {size:,} | {row['rate']:.1f} | {row['steady']:.1f} | {row['driver']:.0f} ({row['driver_anon']:.0f}) "
              f"| {row['actor']:.0f} ({row['actor_anon']:.0f}) | {row['task']:.0f} ({row['task_anon']:.0f}) "
              f"| {row['ray']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
