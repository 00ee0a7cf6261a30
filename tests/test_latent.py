"""Latent diffusion and cross-attention: the KL autoencoder (shapes, KL closed form, training), a two-stage smoke
run sampled through sample.py, and cross-attention conditioning with classifier-free guidance."""

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, run_script
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from diffusion_lab.diffusion.guidance import Guidance
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.models.autoencoder_module import AutoencoderModule
from diffusion_lab.models.components.autoencoder_kl import AutoencoderKL
from diffusion_lab.models.components.cross_attention import ClassTokens, CrossAttention
from diffusion_lab.models.components.unet_attn import UnetAttn


def smooth_images(n: int, size: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """n smooth random images in [-1, 1] (bilinear upsampling of 4x4 noise)."""
    low = torch.rand(n, channels, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False) * 2 - 1


@pytest.mark.parametrize("factor", [2, 4])
def test_encode_decode_shapes(factor):
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(channels=3, image_size=16, factor=factor, latent_channels=3, dim=8)
    x = smooth_images(2, 16, channels=3)
    posterior = autoencoder.encode(x)
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert z.shape == posterior.mean.shape == (2, 3, 16 // factor, 16 // factor)
    assert autoencoder.decode(z).shape == x.shape
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(posterior.mean, posterior.std), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(posterior.kl(), reference.flatten(1).sum(1))


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_autoencoder_reconstruction_error_falls():
    torch.manual_seed(0)
    module = AutoencoderModule(AutoencoderKL(channels=1, image_size=8, factor=2, latent_channels=2, dim=8),
                               optimizer=partial(torch.optim.Adam, lr=3e-3))
    images = smooth_images(8, 8)
    optimizer = module.optimizer_factory(params=module.net.parameters())

    def reconstruction_mse() -> float:
        with torch.no_grad():
            return F.mse_loss(module.net.decode(module.net.encode(images).mean), images).item()

    before = reconstruction_mse()
    for step in range(30):
        loss, _, _ = module.losses(images, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert reconstruction_mse() < before / 4


def image_folder(root: Path, size: int = 8) -> Path:
    """40 smooth grayscale PNGs in two class folders."""
    images = ((smooth_images(40, size) + 1) * 127.5).round().to(torch.uint8)
    for i, image in enumerate(images):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / f"{i:02d}.png")
    return root


def compose_run(overrides: list[str], output_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train.yaml", overrides=[
            *overrides, "data=folder", "data.image_size=8", "data.channels=1", "data.batch_size=8", "data.val_size=8",
            "trainer.accelerator=cpu", "trainer.max_steps=3", "trainer.max_epochs=-1", "trainer.limit_val_batches=1",
            "trainer.val_check_interval=3", "logger=csv", "callbacks.rich_progress_bar=null",
            "callbacks.model_summary=null", "+trainer.enable_progress_bar=false", f"paths.output_dir={output_dir}",
        ])


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_latent_diffusion_samples_images_of_the_data_shape(tmp_path):
    from diffusion_lab.train import train

    data = image_folder(tmp_path / "images")
    stage1 = compose_run(["experiment=autoencoder_fashion_mnist", f"data.root={data}", "model.dim=8"], tmp_path / "ae")
    train(stage1)
    first_stage_ckpt = tmp_path / "ae" / "checkpoints" / "last.ckpt"
    saved = torch.load(first_stage_ckpt, weights_only=True)
    assert saved["first_stage"]["scale_factor"] > 0

    stage2 = compose_run([
        "experiment=latent_ddpm_fashion_mnist", f"first_stage_ckpt={first_stage_ckpt}", f"data.root={data}",
        "model.dim=8", "model.attn_heads=1", "model.attn_dim_head=8", "schedule.timesteps=20", "sampler.steps=5",
        "callbacks.sample_media.every_n_steps=1000", "callbacks.sample_media.num_samples=2",
        "callbacks.sample_media.trajectory_samples=1",
    ], tmp_path / "ldm")
    _, objects = train(stage2)
    model = objects["module"].model
    assert model.latent and model.net.init_conv.in_channels == 2  # the backbone sees the 4x4x2 latents
    run_script("sample.py", [f"ckpt_path={tmp_path / 'ldm' / 'checkpoints' / 'last.ckpt'}", "num_samples=3",
                             "batch_size=2", f"output_dir={tmp_path / 'samples'}", "device=cpu", "trajectory_samples=2"])
    samples = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert samples.shape == (3, 8, 8, 1) and samples.dtype == np.uint8
    assert (tmp_path / "samples" / "trajectory.gif").is_file()


def cross_attention_unet(num_classes: int = 3) -> UnetAttn:
    torch.manual_seed(0)
    return UnetAttn(dim=8, dim_mults=[1, 2], channels=1, image_size=8, num_classes=num_classes, attn_heads=1,
                    attn_dim_head=8, context_encoder=partial(ClassTokens, dim=8, num_tokens=2))


def test_cross_attention_is_softmax_attention_over_the_context():
    torch.manual_seed(0)
    block = CrossAttention(dim=4, context_dim=6, heads=2, dim_head=3)
    x, context = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 6)
    q = block.to_q(block.norm(x)).flatten(2).transpose(1, 2)  # (B, pixels, heads * d)
    k, v = block.to_kv(context).chunk(2, dim=-1)
    heads = []
    for h in range(2):
        part = slice(3 * h, 3 * h + 3)
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / 3**0.5, dim=-1)
        heads.append(weights @ v[..., part])
    out = torch.cat(heads, dim=-1).transpose(1, 2).reshape(2, 6, 3, 3)
    torch.testing.assert_close(block(x, context), x + block.to_out(out))


def test_cross_attention_output_follows_the_context_and_the_null_token_ignores_the_label():
    net = cross_attention_unet()
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 5.0)
    assert net.class_emb is None  # the class enters only through the context
    out = {label: net(x, t, class_labels=torch.full((3,), label)) for label in range(3)}
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    torch.testing.assert_close(net(x, t), net(x, t, class_labels=torch.full((3,), 3)))  # no label = the null token

    # training drops labels to the null token (cond_drop_prob = 1): the loss is then the same whatever the label was
    process = GaussianDiffusion(beta_schedule("linear", 20, 1e-4, 0.02), cond_drop_prob=1.0)
    losses = [process.training_losses(net, x, torch.Generator().manual_seed(0), class_labels=torch.full((3,), label))[0]
              for label in range(3)]
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(losses[0], losses[2])


def test_guidance_scale_zero_is_the_unconditional_prediction():
    net = cross_attention_unet().eval()
    process = GaussianDiffusion(beta_schedule("linear", 20, 1e-4, 0.02))
    x_t, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    level = process.sqrt_alphas_cumprod[7], process.sqrt_one_minus_alphas_cumprod[7]  # (alpha, sigma) at t = 7
    with torch.no_grad():
        guided = process.denoiser(net, clip_denoised=False, guidance=Guidance(0.0), class_labels=labels)(x_t, *level)
        unconditional = process.denoiser(net, clip_denoised=False, class_labels=torch.full((3,), 3))(x_t, *level)
        conditional = process.denoiser(net, clip_denoised=False, class_labels=labels)(x_t, *level)
    torch.testing.assert_close(guided.eps, unconditional.eps, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided.eps, conditional.eps)


def test_backbone_without_context_encoder_keeps_its_parameters():
    torch.manual_seed(0)
    plain = UnetAttn(dim=8, dim_mults=[1, 2], channels=1, image_size=8, num_classes=3, attn_heads=1, attn_dim_head=8)
    names = set(plain.state_dict())
    assert not any("cross" in name or "context" in name for name in names)
    assert {n for n in cross_attention_unet().state_dict() if "cross" not in n and "context" not in n} == names - {
        "class_emb.weight"}
