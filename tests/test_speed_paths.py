"""`channels_last=true` (benchmarks/train_speed.py; `auto`, the default, on a CPU) changes how the convolutions run, not
what the network computes:
one training step's loss and gradients equal the contiguous network's (float32, relative 1e-5 for the loss and
1e-4 for each gradient: the convolution kernels sum in another order), the option really reaches the weights and
the activations, a resumed channels-last run equals an uninterrupted one bit for bit, and its checkpoint loads into
a contiguous network with the same outputs."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONFIGS
from diffusion_lab.builders import build_model, to_memory_format
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.builders import load_model
from test_resume import assert_same_run, last_checkpoint, run
from tiny_run import image_folder, tiny_overrides

BACKBONES = {  # the convolutional backbones, small
    "unet_attn": ["model=unet_attn", "model.dim=8", "model.dim_mults=[1,2]", "model.attn_heads=2", "model.attn_dim_head=8"],
    "ddpm_unet": ["model=ddpm_unet", "model.ch=16", "model.ch_mult=[1,2]", "model.norm_groups=8", "model.dropout=0.0"],
}


def compose_model(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train.yaml", overrides=["data.image_size=16", "schedule.timesteps=20", *overrides])


def one_step(cfg, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(loss, gradients, the outputs of every 3x3 convolution) of one training step from the seed-0 initialisation."""
    torch.manual_seed(0)
    model = build_model(cfg)
    to_memory_format(model.net, cfg.channels_last, torch.device("cpu"))
    activations = {}
    for name, module in model.net.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3):
            module.register_forward_hook(lambda m, args, out, name=name: activations.setdefault(name, out))
    loss = model.loss(images, torch.Generator().manual_seed(1), None)[0].mean()
    loss.backward()
    grads = {name: p.grad for name, p in model.net.named_parameters() if p.grad is not None}
    return loss.detach(), grads, activations


@pytest.mark.parametrize("backbone", BACKBONES)
def test_channels_last_step_equals_the_contiguous_step(backbone, one_thread):
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    loss, grads, _ = one_step(compose_model([*BACKBONES[backbone], "channels_last=false"]), images)
    loss_cl, grads_cl, activations_cl = one_step(compose_model([*BACKBONES[backbone], "channels_last=true"]), images)

    assert torch.allclose(loss_cl, loss, rtol=1e-5, atol=0)
    assert grads_cl.keys() == grads.keys()
    for name in grads:
        scale = grads[name].abs().max().clamp(min=1e-12)
        assert (grads_cl[name] - grads[name]).abs().max() / scale < 1e-4, name
    # the option is not silently ignored: every 3x3 convolution ran on channels-last memory (with one output
    # channel, the two layouts are the same memory)
    assert activations_cl
    for name, out in activations_cl.items():
        assert out.is_contiguous(memory_format=torch.channels_last), name
        assert out.shape[1] == 1 or not out.is_contiguous(), name


def test_channels_last_resume_is_exact_and_its_checkpoint_is_portable(tmp_path, one_thread):
    images = image_folder(tmp_path / "images")
    straight, first, second = tmp_path / "straight", tmp_path / "first", tmp_path / "second"
    run(tiny_overrides(images, straight, 6) + ["channels_last=true"])
    run(tiny_overrides(images, first, 3) + ["channels_last=true"])
    run(tiny_overrides(images, second, 6) + ["channels_last=true", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"])
    checkpoint = last_checkpoint(second)
    assert_same_run(last_checkpoint(straight), checkpoint)
    assert any(v.dim() == 4 and not v.is_contiguous() for v in checkpoint["current_model_state"].values())  # trained so

    # sample.py's loading path builds the network from the saved config (channels-last); a contiguous network
    # loaded from the same checkpoint computes the same function
    loaded = load_model(checkpoint, "ema", torch.device("cpu"))
    contiguous = load_model({**checkpoint, "config": {**checkpoint["config"], "channels_last": False}}, "ema",
                            torch.device("cpu"))
    assert any(p.dim() == 4 and not p.is_contiguous() for p in loaded.net.parameters())
    assert all(p.is_contiguous() for p in contiguous.net.parameters())
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 7.0, 15.0])
    with torch.no_grad():
        assert torch.allclose(loaded.net(x, t), contiguous.net(x, t), rtol=1e-5, atol=1e-6)


def test_channels_last_auto_is_on_for_a_cpu_only_and_a_bad_value_is_one_line():
    def weights_contiguous(channels_last, device_type: str) -> bool:
        net = torch.nn.Conv2d(4, 8, 3)
        to_memory_format(net, channels_last, torch.device(device_type))
        return net.weight.is_contiguous()

    assert not weights_contiguous("auto", "cpu") and weights_contiguous("auto", "cuda")
    assert not weights_contiguous(True, "cuda") and weights_contiguous(False, "cpu") and weights_contiguous(None, "cpu")
    with pytest.raises(ConfigError, match="channels_last='yes' must be true, false or auto"):
        weights_contiguous("yes", "cpu")
