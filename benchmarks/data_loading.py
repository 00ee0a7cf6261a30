"""Peak memory and images/s of the training loaders: today's in-memory folder (every image decoded up front), the
lazy folder (decoded file by file in the loader's workers) and litdata shards (`data=shards`), at a size where all
fit in memory, and the shards at a size ten times larger; ratios against the in-memory folder.

    python benchmarks/data_loading.py --work /work/runs/data_loading            # 20,000 and 200,000 64x64 RGB
    python benchmarks/data_loading.py --work DIR --small 2000 --large 20000    # a quick look

The data sets are generated once under --work (random RGB noise PNGs, the worst case for PNG; shards written by
`diffusion_lab.data.prepare`) and reused. Each loader runs `--epochs` passes in a fresh process; memory is the peak
of the proportional set size (PSS: shared pages split among processes) summed over the process and its loader
workers, sampled every 50 ms. The page cache is warm (the files were just written or read).
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

IMAGE_SIZE = 64


def pss_mib(pids: list[int]) -> tuple[float, float]:
    """(PSS, anonymous PSS) in MiB summed over `pids`, from /proc/<pid>/smaps_rollup."""
    total = anon = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                elif line.startswith("Pss_Anon:"):
                    anon += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1024, anon / 1024


def process_tree() -> list[int]:
    me, pids = os.getpid(), [os.getpid()]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == me:
                pids.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return pids


class PeakMemory(threading.Thread):
    """Samples the PSS of this process and its children every 50 ms; `peak` holds the largest (PSS, anon PSS)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = (0.0, 0.0), True

    def run(self) -> None:
        while self.running:
            total, anon = pss_mib(process_tree())
            self.peak = (max(self.peak[0], total), max(self.peak[1], anon))
            time.sleep(0.05)


def make_folder(root: Path, count: int) -> None:
    """`count` random 64x64 RGB PNGs in 10 class folders (kept when already complete)."""
    from PIL import Image

    if (root / "complete").is_file():
        return
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    (root / "complete").touch()


def make_shards(folder: Path, out: Path, workers: int) -> float:
    """`python -m diffusion_lab.data.prepare` of the folder; its images/s (0 when already prepared)."""
    if (out / "prepared.json").is_file() and json.loads((out / "prepared.json").read_text()).get("complete"):
        return 0.0
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "diffusion_lab.data.prepare", "data=folder", f"data.root={folder}",
                             f"data.image_size={IMAGE_SIZE}", "data.val_size=100", f"out={out}",
                             f"num_workers={workers}"], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"prepare failed: {result.stderr[-2000:]}")
    return sum(1 for _ in folder.rglob("*.png")) / (time.perf_counter() - start)


def measure(kind: str, root: str, workers: int, batch_size: int, epochs: int) -> dict:
    """Setup seconds, images/s of each pass and peak memory of one loader (run in its own process)."""
    import torch

    from diffusion_lab.data.image_datamodule import ImageDataModule
    from diffusion_lab.data.shards import ShardsDataModule

    torch.set_num_threads(1)
    memory = PeakMemory()
    memory.start()
    start = time.perf_counter()
    common = dict(image_size=IMAGE_SIZE, channels=3, batch_size=batch_size, num_workers=workers)
    if kind == "shards":
        data = ShardsDataModule(root, **common)
    else:
        limit = 0 if kind == "lazy" else 2**20
        data = ImageDataModule("folder", root, val_size=100, in_memory_limit_mb=limit, **common)
    data.setup("fit")
    loader = data.train_dataloader()
    setup = time.perf_counter() - start
    rates = []
    for epoch in range(epochs):
        if kind != "shards":
            loader.sampler.set_epoch(epoch)
        count, start = 0, time.perf_counter()
        for images, _ in loader:
            count += len(images)
        rates.append(count / (time.perf_counter() - start))
    memory.running = False
    memory.join()
    return {"kind": kind, "images": len(data.train_set) if kind != "shards" else data.meta["splits"]["train"],
            "workers": workers, "setup_s": setup, "images_per_s": rates, "peak_pss_mib": memory.peak[0],
            "peak_anon_pss_mib": memory.peak[1]}


def run_case(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--case", *args], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/work/runs/data_loading"), help="where the data sets go")
    parser.add_argument("--small", type=int, default=20_000, help="images in the set all loaders hold")
    parser.add_argument("--large", type=int, default=200_000, help="images in the shards only set")
    parser.add_argument("--workers", type=int, default=2, help="loader workers (lazy folder, shards) and prepare's")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--case", nargs=2, metavar=("KIND", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(*args.case, args.workers, args.batch_size, args.epochs)))
        return

    prepared = {}
    for name, count in (("small", args.small), ("large", args.large)):
        make_folder(args.work / f"{name}_folder", count)
        prepared[name] = make_shards(args.work / f"{name}_folder", args.work / f"{name}_shards", args.workers)
        if name == "large":  # only its shards are read
            subprocess.run(["rm", "-rf", str(args.work / "large_folder")], check=True)
    for name, rate in prepared.items():
        if rate:
            print(f"prepare ({name}, {args.workers} workers): {rate:,.0f} images/s")
    w = str(args.workers)
    cases = [("in-memory folder (today), 0 workers", "folder", "small_folder", "0"),
             (f"lazy folder, {w} workers", "lazy", "small_folder", w),
             ("shards, 0 workers", "shards", "small_shards", "0"),
             (f"shards, {w} workers", "shards", "small_shards", w),
             (f"shards, {w} workers", "shards", "large_shards", w)]
    rows = []
    for label, kind, root, workers in cases:
        result = run_case(kind, str(args.work / root), "--workers", workers, "--batch-size", str(args.batch_size),
                          "--epochs", str(args.epochs))
        rows.append((label, result))
    base = rows[0][1]
    print(f"{'loader':38} {'images':>8} {'setup s':>8} " + " ".join(f"{f'epoch {e + 1} img/s':>14}" for e in
                                                                       range(args.epochs))
          + f" {'x today':>8} {'peak PSS MiB':>13} {'x today':>8} {'anon MiB':>9}")
    for label, r in rows:
        print(f"{label:38} {r['images']:>8,} {r['setup_s']:>8.1f} "
              + " ".join(f"{rate:>14,.0f}" for rate in r["images_per_s"])
              + f" {r['images_per_s'][-1] / base['images_per_s'][-1]:>8.2f} {r['peak_pss_mib']:>13,.0f}"
              + f" {r['peak_pss_mib'] / base['peak_pss_mib']:>8.2f} {r['peak_anon_pss_mib']:>9,.0f}")
    print(f"decoded size of the large set: {args.large * 3 * IMAGE_SIZE**2 / 2**20:,.0f} MiB "
          f"(the in-memory folder would hold it all, and a copy during setup)")


if __name__ == "__main__":
    main()
