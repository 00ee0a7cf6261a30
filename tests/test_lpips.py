"""LPIPS (models/components/lpips.py: the lpips package's network, filled from files) on random weights written in the real layouts (torchvision's vgg16-397923af.pth, the lpips package's v0.1/vgg.pth) through the project's loader; a
tiny consistency-distillation run with module.metric=lpips; and the one-line errors for missing or wrong files."""

from pathlib import Path

import lpips
import pytest
import torch

from test_few_step import tiny
from test_resume import last_checkpoint, run
from tiny_run import image_folder

from diffusion_lab.diffusion.consistency import lpips_metric
from diffusion_lab.models.components.lpips import load_lpips
from diffusion_lab.builders import load_model
from diffusion_lab.utils.checkpoint import load_checkpoint
from diffusion_lab.utils.errors import ConfigError



@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The reference LPIPS with random trunk and linear layers, and its weights written as the two real files."""
    torch.manual_seed(0)
    reference = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    for lin in reference.lins:  # non-negative, as the learned ones are
        lin.model[1].weight.data.uniform_(0, 1)
    root = tmp_path_factory.mktemp("lpips")
    state = reference.state_dict()
    vgg = {"features." + name.split(".", 2)[2]: value for name, value in state.items() if name.startswith("net.slice")}
    torch.save(vgg, root / "vgg16-397923af.pth")
    torch.save({name: value for name, value in state.items() if name.startswith("lin")}, root / "vgg.pth")
    return reference, root / "vgg.pth", root / "vgg16-397923af.pth"


def test_lpips_holds_the_files_weights_and_is_the_packages_distance(weights, one_thread):
    """The loaded network holds every VGG16 and linear weight of the two files where the lpips package keeps them
    (features.N -> net.sliceK.N, linK.model.1 -> lins.K.model.1), so it gives the reference's distances on random
    pairs in [-1, 1]; grayscale is scored as the reference sees it, repeated to RGB."""
    reference, lin_path, vgg_path = weights
    ours = load_lpips(str(lin_path), str(vgg_path))
    vgg, lins = torch.load(vgg_path, weights_only=True), torch.load(lin_path, weights_only=True)
    loaded = ours.network.state_dict()
    for name, value in vgg.items():
        index = int(name.split(".")[1])
        k = next(k for k, end in enumerate((4, 9, 16, 23, 30), 1) if index < end)
        assert torch.equal(loaded[f"net.slice{k}.{name.removeprefix('features.')}"], value), name
    for k in range(5):
        assert torch.equal(loaded[f"lins.{k}.model.1.weight"], lins[f"lin{k}.model.1.weight"]), k
    generator = torch.Generator().manual_seed(1)
    for shape in ((3, 3, 64, 64), (2, 1, 48, 48)):
        x, y = (torch.rand(shape, generator=generator) * 2 - 1 for _ in range(2))
        with torch.no_grad():
            expected = reference(x.repeat(1, 3 // shape[1], 1, 1), y.repeat(1, 3 // shape[1], 1, 1)).flatten()
            got = ours(x, y)
        assert got.shape == (shape[0],) and (expected > 0).all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_average_pooling_is_the_package_network_with_its_max_poolings_averaged(weights, one_thread):
    """lpips_pooling=average (piq's replace_pooling, Song et al.'s code): each of VGG's four 2x2 max-poolings is a
    2x2 average pooling, and the distances are the reference network's with the same swap, not the max-pooled ones."""
    import copy

    reference, lin_path, vgg_path = weights
    ours = load_lpips(str(lin_path), str(vgg_path), pooling="average")
    layers = [layer for layer in ours.network.net.modules() if isinstance(layer, (torch.nn.MaxPool2d, torch.nn.AvgPool2d))]
    assert len(layers) == 4 and all(isinstance(layer, torch.nn.AvgPool2d) and layer.kernel_size == 2
                                    and layer.stride == 2 for layer in layers)
    averaged = copy.deepcopy(reference)
    for slice_ in averaged.net.children():
        for index, layer in slice_.named_children():
            if isinstance(layer, torch.nn.MaxPool2d):
                setattr(slice_, index, torch.nn.AvgPool2d(2, 2))
    x, y = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1 for seed in (3, 4))
    with torch.no_grad():
        expected, max_pooled = averaged(x, y).flatten(), reference(x, y).flatten()
        torch.testing.assert_close(ours(x, y), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, max_pooled, rtol=1e-3)


def test_lpips_is_zero_on_identical_images_and_passes_gradients_to_the_inputs_only(weights, one_thread):
    _, lin_path, vgg_path = weights
    ours = load_lpips(str(lin_path), str(vgg_path))
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert torch.equal(ours(x, x.clone()), torch.zeros(2))
    x.requires_grad_(True)
    lpips_metric(ours)(x, torch.zeros_like(x)).sum().backward()  # resized to 224 on the way, as CD does
    assert x.grad is not None and x.grad.abs().sum() > 0 and x.grad.isfinite().all()
    assert not ours.training and all(not p.requires_grad and p.grad is None for p in ours.parameters())


def test_the_lpips_packages_own_linear_layers_file_loads(weights):
    """The shipped v0.1/vgg.pth (saved with CUDA storages) loads through module.lpips_weights."""
    _, _, vgg_path = weights
    shipped = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    state = torch.load(shipped, map_location="cpu")
    ours = load_lpips(str(shipped), str(vgg_path))
    for k, lin in enumerate(ours.network.lins):
        assert torch.equal(lin.model[1].weight, state[f"lin{k}.model.1.weight"])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    images = image_folder(root / "images")
    run(tiny("edm_fashion_mnist", images, root / "edm"))
    return images, root / "edm" / "checkpoints" / "last.ckpt"


def cd_lpips(images, teacher_ckpt, output_dir, steps: int = 1) -> list[str]:
    """Tiny CD overrides with batches of 2 and one validation batch (VGG16 at 224 x 224 is the cost on a CPU)."""
    return tiny("consistency_distillation", images, output_dir, steps) + [
        f"teacher_ckpt={teacher_ckpt}", "data.batch_size=2", "trainer.limit_val_batches=1", "module.metric=lpips"]


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_consistency_distillation_with_lpips_trains(weights, teacher, tmp_path, one_thread):
    """Two steps with module.metric=lpips change the student; LPIPS is not saved in its checkpoint."""
    _, lin_path, vgg_path = weights
    images, teacher_ckpt = teacher
    run(cd_lpips(images, teacher_ckpt, tmp_path / "cd", 2)
        + [f"module.lpips_weights={lin_path}", f"module.vgg_weights={vgg_path}"])
    checkpoint = last_checkpoint(tmp_path / "cd")
    assert checkpoint["global_step"] == 2
    assert not any("lpips" in name or "vgg" in name for name in checkpoint["state_dict"])
    start = load_model(load_checkpoint(teacher_ckpt), "ema", torch.device("cpu")).net.state_dict()  # init_student
    student = {name.removeprefix("model.net."): value for name, value in checkpoint["state_dict"].items()
               if name.startswith("model.net.")}
    assert student.keys() == start.keys() and any(not torch.equal(student[name], start[name]) for name in start)


@pytest.mark.parametrize("extra, message", [
    ([], "module.metric=lpips needs module.lpips_weights=PATH, the lpips package's lpips/weights/v0.1/vgg.pth"),
    (["module.lpips_weights=/nonexistent/vgg.pth", "module.vgg_weights={vgg}"],
     "module.lpips_weights=/nonexistent/vgg.pth is not a file; download https://github.com/richzhang"),
    (["module.lpips_weights={vgg}", "module.vgg_weights={vgg}"],
     r"module.lpips_weights=\S+ has no lin0.model.1.weight"),
    (["module.lpips_weights={lin}", "module.vgg_weights={lin}"],
     r"module.vgg_weights=\S+ does not hold the weights looked for .*; it should be vgg16-397923af.pth from"),
    (["module.lpips_weights={lin}", "module.vgg_weights={text}"],
     r"module.vgg_weights=\S+ is not a PyTorch weights file"),
    (["module.lpips_weights={lin}"],
     r"the VGG16 weights of module.metric=lpips are absent: looked in module.vgg_weights \(null\) and "
     r"\S+vgg16-397923af.pth; download"),
    (["module.lpips_weights={lin}", "module.vgg_weights={vgg}", "process.huber_c=0.1"],
     "process.huber_c=0.1 is the pseudo-Huber constant, unused with module.metric=lpips"),
    (["module.metric=pseudo_huber", "module.lpips_weights={lin}"], "read only with module.metric=lpips"),
    (["module.metric=pseudo_huber", "module.lpips_pooling=average"], "read only with module.metric=lpips"),
    (["module.lpips_weights={lin}", "module.vgg_weights={vgg}", "module.lpips_pooling=mean"],
     "module.lpips_pooling='mean' is not allowed; choose one of max, average"),
    (["module.metric=l2"], "module.metric='l2' is not allowed; choose one of pseudo_huber, lpips"),
])
def test_bad_lpips_options_are_one_config_error_line(weights, teacher, tmp_path, monkeypatch, extra, message):
    _, lin_path, vgg_path = weights
    images, teacher_ckpt = teacher
    (tmp_path / "notes.txt").write_text("not weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    extra = [e.format(lin=lin_path, vgg=vgg_path, text=tmp_path / "notes.txt") for e in extra]
    with pytest.raises(ConfigError, match=message) as error:
        run(cd_lpips(images, teacher_ckpt, tmp_path / "bad") + extra)
    assert "\n" not in str(error.value)
