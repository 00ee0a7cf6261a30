"""The model summary at the start of training counts the real FLOPs: each LightningModule gives Lightning an example
input for its forward (one network evaluation on one sample), so the summary's "Total FLOPs" (0 without one) is
torch's FlopCounterMode count of the backbone on that input."""

import pytest
import torch
from lightning.pytorch.utilities.model_summary import get_human_readable_count, summarize
from torch.utils.flop_counter import FlopCounterMode

from test_resume import run
from tiny_run import image_folder, tiny_overrides

DIFFUSION_ONLY = {"model.dim", "model.dim_mults", "model.attn_heads", "model.attn_dim_head", "schedule.timesteps"}
CASES = {
    "diffusion": [],
    "diffusion_conditional": ["data.conditional=true"],
    "autoencoder": ["experiment=autoencoder_fashion_mnist", "model.dim=8", "callbacks.model_checkpoint.monitor=null"],
    "feature_classifier": ["experiment=feature_classifier", "model.widths=[8]", "model.feature_dim=16",
                           "callbacks.model_checkpoint.monitor=null"],
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


def backbone_flops(module) -> int:
    """FlopCounterMode's count of the backbone on one zero sample: net(x, t[, class_labels]) or net(images)."""
    model = getattr(module, "model", None)
    with FlopCounterMode(display=False) as counter:
        if model is None:  # the autoencoder and the classifier train a network
            module.net(torch.zeros(1, 1, 8, 8))
        else:
            labels = {"class_labels": torch.zeros(1, dtype=torch.long)} if model.conditional else {}
            model.net(torch.zeros(1, *model.sample_shape), torch.zeros(1), **labels)
    return counter.get_total_flops()


@pytest.mark.parametrize("case", CASES)
def test_the_model_summary_counts_the_backbones_flops(case, images, tmp_path, one_thread, capsys):
    overrides = [o for o in tiny_overrides(images, tmp_path / "run", 1) if o != "callbacks.model_summary=null"
                 and (case.startswith("diffusion") or o.split("=")[0] not in DIFFUSION_ONLY)]  # the U-Net's, DDPM's
    _, objects = run(overrides + CASES[case])
    flops = backbone_flops(objects["module"])
    assert flops > 0
    assert f"Total FLOPs: {get_human_readable_count(flops)}" in capsys.readouterr().out  # as the run printed it
    summary = summarize(objects["module"], max_depth=1)
    assert summary.total_flops == flops
    assert [sum(counts.values()) for counts in summary.flop_counts.values()] == [flops]  # its one row
