"""Images/s of encoding a data set into latent shards (`prepare ... first_stage=PATH`) against preparing the same
images as image shards (no first stage) in the same run, and the bytes each sample takes on disk.

    python benchmarks/encode_latents.py --work /work/runs/encode_latents                        # project AE, 32x32
    python benchmarks/encode_latents.py --work DIR --first-stage sd_vae --image-size 256 --images 32 --batch-size 8

First stages, randomly initialised (speed does not depend on the weights): `autoencoder`, the project's KL
autoencoder of experiment=autoencoder_cifar10 (dim 64, factor 4, 4 latent channels); `sd_vae`, a diffusers
AutoencoderKL in Stable Diffusion's VAE layout (128-256-512-512, 2 layers a block, 4 latent channels). Images are
random RGB PNGs in one folder, generated once under --work. --device picks where one process encodes.
"""

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion_lab.data.prepare import prepare
from diffusion_lab.models.components.autoencoder_kl import AutoencoderKL
from diffusion_lab.config import compose_config


def image_folder(root: Path, count: int, size: int) -> Path:
    if not root.is_dir() or len(list(root.rglob("*.png"))) != count:
        shutil.rmtree(root, ignore_errors=True)
        rng = np.random.default_rng(0)
        for i in range(count):
            folder = root / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return root


def first_stage(kind: str, path: Path, size: int) -> Path:
    """A randomly initialised first stage of `kind` saved at `path` (checkpoint file or VAE folder)."""
    torch.manual_seed(0)
    if kind == "sd_vae":
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL

        DiffusersAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                               block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                               sample_size=size).save_pretrained(path)
        return path
    model = {"_target_": "diffusion_lab.models.components.autoencoder_kl.AutoencoderKL", "channels": 3,
             "image_size": size, "factor": 4, "latent_channels": 4, "dim": 64}
    net = AutoencoderKL(**{key: value for key, value in model.items() if key != "_target_"})
    torch.save({"config": {"model": model}, "first_stage": {"scale_factor": 1.0},
                "state_dict": {f"net.{name}": value for name, value in net.state_dict().items()}}, path)
    return path


def timed_prepare(overrides: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cfg = compose_config("prepare", [*overrides, f"out={out}"])
    began = time.perf_counter()
    prepare(cfg)
    return time.perf_counter() - began


def bytes_per_sample(out: Path, count: int) -> float:
    return sum(p.stat().st_size for p in out.rglob("chunk-*.bin")) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--first-stage", choices=["autoencoder", "sd_vae"], default="autoencoder")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2, help="decoding workers (both runs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--latent-dtype", default="float16")
    args = parser.parse_args()

    size = args.image_size
    folder = image_folder(args.work / f"images_{args.images}_{size}", args.images, size)
    suffix = "" if args.first_stage == "sd_vae" else ".ckpt"
    stage = first_stage(args.first_stage, args.work / f"{args.first_stage}_{size}{suffix}", size)
    data = ["data=folder", f"data.root={folder}", f"data.image_size={size}", "data.channels=3", "data.val_size=10",
            f"num_workers={args.num_workers}"]
    image_seconds = timed_prepare(data, args.work / "image_shards")
    latent_seconds = timed_prepare([*data, f"first_stage={stage}", f"batch_size={args.batch_size}",
                                    f"device={args.device}", f"latent_dtype={args.latent_dtype}"],
                                   args.work / "latent_shards")
    n = args.images
    print(f"{args.first_stage} at {size}x{size}, {n} images, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"| shards | s | images/s | x image shards | bytes/sample |\n|---|---|---|---|---|")
    print(f"| images (uint8) | {image_seconds:.1f} | {n / image_seconds:.1f} | 1.00 | "
          f"{bytes_per_sample(args.work / 'image_shards', n):.0f} |")
    print(f"| latents ({args.latent_dtype} moments) | {latent_seconds:.1f} | {n / latent_seconds:.1f} | "
          f"{image_seconds / latent_seconds:.2f} | {bytes_per_sample(args.work / 'latent_shards', n):.0f} |")


if __name__ == "__main__":
    main()
