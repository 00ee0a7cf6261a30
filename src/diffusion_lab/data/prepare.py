"""Write a data set as litdata shards for `data=shards`:

    python -m diffusion_lab.data.prepare data=folder data.root=DIR out=SHARDS [data.image_size=N] [num_workers=N]
    python -m diffusion_lab.data.prepare data=cifar10 out=SHARDS
    python -m diffusion_lab.data.prepare data=hf data.root=DIR out=SHARDS     # a datasets.Dataset.save_to_disk folder
    python -m diffusion_lab.data.prepare data=cifar10 first_stage=AE.ckpt out=LATENTS   # latents: see data/latents.py

Each image is resized (short side) and center-cropped to data.image_size (null: kept as it is, which needs one
square size for all), stored as uint8 (C, H, W) with its label by `litdata.optimize` (progress bar included).
Splits: `val` holds the data.val_size images ImageDataModule holds out, `train` the rest (in that held-out
permutation's order, so every chunk mixes the classes), `test` the data set's test split (a folder has none).
Stopped (Ctrl-C, a bad file), the same command goes on where it stopped: finished splits are kept and litdata's
checkpoints resume the unfinished one from its last written chunk (latents: the unfinished split is encoded again).
"""

import contextlib
import ctypes
import functools
import json
import os
import re
import signal
import sys
from pathlib import Path

import litdata
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from torch import Tensor

from diffusion_lab.data import datasets, hf, latents
from diffusion_lab.data.image_datamodule import held_out
from diffusion_lab.data.shards import FORMAT_VERSION, META_FILE, is_url
from diffusion_lab.models.first_stage import load_first_stage, save_first_stage
from diffusion_lab.config import hydra_main
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import atomic_path, check_writable_folder
from diffusion_lab.utils.launch import launch

SOURCES = ("fashion_mnist", "mnist", "cifar10", "folder", "hf")
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)

ConfigStore.instance().store(name="prepare", node={
    "defaults": ["_self_", {"data": "fashion_mnist"}, {"paths": "default"}, {"trainer": None},
                 {"override hydra/job_logging": "disabled"}, {"override hydra/hydra_logging": "disabled"}],
    "out": "???",  # the shards folder to write (local; copy it to object storage afterwards if wanted)
    "num_workers": None,  # processes that decode and write (null: one per CPU core); a resumed run must use the same number
    "chunk_bytes": "64MB",  # litdata's chunk size: each DDP rank and loader worker streams whole chunks
    "seed": 0,  # unused here: the data configs interpolate it
    "first_stage": None,  # an autoencoder checkpoint or a diffusers VAE folder: write its latents (data/latents.py)
    "latent_dtype": "float16",  # float16 | float32: how the latents' posterior moments are stored
    "batch_size": 64,  # images per encoder call on each device
    "device": "auto",  # where one process encodes (auto | cpu | cuda | cuda:N); trainer=ddp trainer.devices=N: N ranks
    "hydra": {"run": {"dir": "."}, "output_subdir": None},
})


def folder_sample(index: int, files: list[str], labels: Tensor, image_size: int | None, channels: int) -> dict:
    return {"image": datasets.load_image(files[index], image_size, channels).numpy(), "label": int(labels[index])}


def array_sample(index: int, images: Tensor, labels: Tensor, image_size: int) -> dict:
    image = images[index]
    if image.shape[-2:] != (image_size, image_size):
        image = datasets.resize_crop(image, image_size)
    return {"image": image.numpy(), "label": int(labels[index])}


def hf_sample(index: int, dataset, image_column: str, label_column: str | None, image_size: int, channels: int,
              resize: bool) -> dict:
    label = int(dataset[index][label_column]) if label_column is not None else 0
    return {"image": hf.row_image(dataset, index, image_column, image_size, channels, resize).numpy(), "label": label}


def folder_image_size(files: list[str]) -> int:
    """The one square size of every image (data.image_size=null keeps sizes as they are)."""
    from PIL import Image

    sizes = {}
    for path in files:
        with Image.open(path) as image:
            sizes.setdefault(image.size, path)
    if len(sizes) > 1 or any(w != h for w, h in sizes):
        found = ", ".join(f"{w}x{h} ({path})" for (w, h), path in list(sizes.items())[:3])
        raise ConfigError(f"data.image_size=null keeps each image's size, but the images are not all of one square "
                          f"size: {found}; set data.image_size=N to resize and center-crop them")
    return next(iter(sizes))[0]


def plan(data: DictConfig) -> tuple[dict, dict]:
    """(the settings prepared.json records, {split: (litdata fn, input indices)}) of a data config."""
    if data.get("dataset") not in SOURCES:
        raise ConfigError(f"data={data.get('dataset')} cannot be prepared; choose one of {', '.join(SOURCES)}")
    if data.channels not in (1, 3):
        raise ConfigError(f"data.channels={data.channels} must be 1 or 3")
    image_size = data.image_size
    if data.dataset == "folder":
        files, labels, classes = datasets.folder_files(data.root)
        image_size = image_size or folder_image_size(files)
        fns = {"train": functools.partial(folder_sample, files=files, labels=labels, image_size=image_size,
                                          channels=data.channels)}
        sizes, num_classes, extra = {"train": len(files)}, len(classes), {"classes": classes}
    elif data.dataset == "hf":
        splits = hf.load_splits(data.root)
        for split in splits.values():
            hf.check_columns(split, data.image_column, data.label_column)
        image_size = image_size or hf.pil_image(splits["train"], 0, data.image_column).width
        fns = {split: functools.partial(hf_sample, dataset=dataset, image_column=data.image_column,
                                        label_column=data.label_column, image_size=image_size, channels=data.channels,
                                        resize=data.image_size is not None)
               for split, dataset in splits.items()}
        sizes = {split: len(dataset) for split, dataset in splits.items()}
        classes = hf.class_names(splits["train"], data.label_column)
        num_classes, extra = (len(classes), {"classes": classes}) if classes else (data.num_classes, {})
    else:
        loaded = {split: getattr(datasets, data.dataset)(data.root, split == "train") for split in ("train", "test")}
        channels, size = loaded["train"][0].shape[1], loaded["train"][0].shape[-1]
        if channels != data.channels:
            raise ConfigError(f"data set {data.dataset} has {channels}-channel images, but data.channels="
                              f"{data.channels}; set them to match")
        image_size = image_size or size
        fns = {split: functools.partial(array_sample, images=images, labels=labels, image_size=image_size)
               for split, (images, labels) in loaded.items()}
        sizes = {split: len(images) for split, (images, _) in loaded.items()}
        num_classes, extra = data.num_classes, {}
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"data.image_size={image_size} must be an integer >= 1, or null")
    val, train = held_out(sizes["train"], data.val_size)
    jobs = {"train": (fns["train"], train.tolist()), "val": (fns["train"], val.tolist())}
    if "test" in fns:
        jobs["test"] = (fns["test"], list(range(sizes["test"])))
    settings = {
        "format_version": FORMAT_VERSION,
        "source": {"dataset": data.dataset, "root": str(source_root(data).resolve())},
        "image_shape": [data.channels, image_size, image_size],
        "num_classes": num_classes,
        **extra,
        "splits": {split: len(indices) for split, (_, indices) in jobs.items()},
    }
    return settings, jobs


def source_root(data: DictConfig) -> Path:
    """Where the images are read from: data.root, or for Fashion-MNIST the first folder holding its files (data.root,
    then the Debian package's)."""
    if data.dataset == "fashion_mnist":
        return datasets.fashion_mnist_folder(data.root) or Path(data.root)
    return Path(data.root)


def write_meta(out: Path, meta: dict) -> None:
    with atomic_path(out / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))


def root_cause(error: BaseException) -> str:
    """The first `SomeError: message` line of a litdata worker's traceback (the worker's own exception)."""
    causes = re.findall(r"^[\w.]*(?:Error|Exception): .*$", str(error), flags=re.M)
    return causes[0] if causes else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def children() -> set[int]:
    return {int(pid) for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()}


class DroppingLines:
    """A text stream that passes on what is written to `stream`, except the lines that start with `prefixes`."""

    def __init__(self, stream, prefixes: tuple[str, ...]):
        self.stream, self.prefixes = stream, prefixes

    def write(self, text: str) -> int:
        if not text.startswith(self.prefixes):
            self.stream.write(text)
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def optimize(**kwargs) -> None:
    """`litdata.optimize`, cleaning up after it. When a worker fails, litdata (0.2.76) kills it but not the file
    remover process it started, which then waits on its queue for ever; with this process as child subreaper
    (Linux) it becomes our child and is killed here. litdata also leaves its SIGINT handler installed: restored."""
    previous = signal.getsignal(signal.SIGINT)
    linux = Path(f"/proc/self/task/{os.getpid()}/children").is_file()
    if linux:
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        before = children()
    try:
        with contextlib.redirect_stdout(DroppingLines(sys.stdout, ("Create an account on https://lightning.ai/",))):
            litdata.optimize(**kwargs)  # its advertisement for its cloud is not this command's business
    finally:
        signal.signal(signal.SIGINT, previous)
        while linux and (strays := children() - before):  # a killed worker's remover then becomes ours
            for pid in strays:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        if linux:
            ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def write_images(fn, indices: list[int], out_dir: Path, num_workers: int, chunk_bytes: str) -> None:
    """One split of images through `litdata.optimize` (num_workers processes, resumable from its last chunk)."""
    split = out_dir.name
    try:
        optimize(fn=fn, inputs=indices, output_dir=str(out_dir), chunk_bytes=chunk_bytes, num_workers=num_workers,
                 use_checkpoint=True, start_method="fork")
    except Exception as error:  # noqa: BLE001 - a worker's failure arrives as its traceback's text
        raise ConfigError(f"writing the {split} split stopped: {root_cause(error)}; fix it and run the same "
                          "command again, it goes on from the last chunk written") from error


def previous_meta(out: Path, settings: dict) -> dict | None:
    """The prepared.json already in `out` (None: a new or empty folder); ConfigError if it has other settings."""
    if not (out / META_FILE).is_file():
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"out={out} is not empty and holds no {META_FILE}; choose an empty or new folder")
        return None
    previous = json.loads((out / META_FILE).read_text())
    keys = (settings.keys() | previous.keys()) - {"complete"}
    differ = [key for key in keys if previous.get(key) != settings.get(key)]
    if differ:
        raise ConfigError(f"out={out} holds shards prepared with other settings ({', '.join(sorted(differ))}); "
                          "choose another out, or delete it to start again")
    return previous


def prepare(cfg: DictConfig) -> dict:
    """Write (or finish writing) the shards of `cfg.data` into `cfg.out`, images or (cfg.first_stage) their latents;
    returns the prepared.json written."""
    if is_url(cfg.out):
        raise ConfigError(f"out={cfg.out} must be a local folder; copy it to object storage once written")
    out = Path(cfg.out)
    check_writable_folder(out, "out")
    settings, jobs = plan(cfg.data)
    num_workers = len(os.sched_getaffinity(0)) if cfg.num_workers is None else cfg.num_workers
    least = 0 if cfg.first_stage else 1  # encoding: DataLoader workers (0: the main process); images: litdata's writers
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < least:
        raise ConfigError(f"num_workers={num_workers} must be an integer >= {least}, or null (one per CPU core)")
    fabric = None
    if cfg.first_stage:  # every rank (one per device) runs what follows; only rank 0 writes prepared.json
        fabric = launch(cfg)
        first_stage, config = load_first_stage(cfg.first_stage, settings["image_shape"], "first_stage")
        first_stage.to(fabric.device)
        settings |= {"latents": latents.latent_record(first_stage, config, cfg.first_stage, cfg.latent_dtype),
                     "chunk_bytes": cfg.chunk_bytes}
        write = functools.partial(latents.encode_split, fabric, first_stage, batch_size=cfg.batch_size,
                                  num_workers=num_workers, dtype=cfg.latent_dtype, chunk_bytes=cfg.chunk_bytes)
    else:
        settings |= {"num_workers": num_workers, "chunk_bytes": cfg.chunk_bytes}
        write = functools.partial(write_images, num_workers=num_workers, chunk_bytes=cfg.chunk_bytes)
    previous = previous_meta(out, settings)
    if previous is not None and previous.get("complete"):
        print(f"{out} is already prepared: {previous['splits']}")
        return previous
    rank_zero = fabric is None or fabric.global_rank == 0
    if fabric is not None:
        fabric.barrier()  # every rank has read prepared.json before rank 0 writes it
    if rank_zero:
        write_meta(out, {**settings, "complete": False})
        if fabric is not None:
            save_first_stage(first_stage, config, out / latents.FIRST_STAGE_FILE)
    for split, (fn, indices) in jobs.items():
        if (out / split / "index.json").is_file():
            if rank_zero:
                print(f"{split}: already written")
            continue
        if rank_zero:
            print(f"{split}: {len(indices)} {'latents' if fabric else 'images'} into {out / split}")
        write(fn, indices, out / split)
    meta = {**settings, "complete": True}
    if rank_zero:
        write_meta(out, meta)
    return meta


@hydra_main("prepare")
def main(cfg: DictConfig) -> None:
    prepare(cfg)


if __name__ == "__main__":
    main()
