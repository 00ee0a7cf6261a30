"""Two-process DDP on CPU (gloo) through `python train.py trainer=ddp`: Lightning re-launches the script for rank 1
and Hydra must hand it rank 0's run folder."""

import pytest
import torch

from diffusion_lab.utils.checkpoint import load_checkpoint, model_weights
from tiny_run import image_folder, run_train, tiny_overrides


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_two_rank_ddp_keeps_ranks_in_sync_and_writes_one_run(tmp_path):
    output_dir, probe_dir = tmp_path / "run", tmp_path / "probe"
    run_train(tiny_overrides(image_folder(tmp_path / "images"), output_dir, max_steps=3) + [
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.sync_batchnorm=false",
        "+callbacks.probe._target_=tiny_run.RankProbe", f"+callbacks.probe.dirpath={probe_dir}",
    ])
    ranks = [torch.load(probe_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    # each rank trained on its own shard of the data ...
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])
    # ... and the all-reduced gradients left both with the same weights, bit for bit
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name

    # one run folder for both ranks: one checkpoints dir, one saved config, nothing written elsewhere
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("checkpoints")] == [output_dir.relative_to(tmp_path)
                                                                                  / "checkpoints"]
    assert (output_dir / ".hydra" / "config.yaml").is_file()
    assert not (tmp_path / "logs").exists()
    checkpoint = load_checkpoint(output_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3
    # the model object's own names (model.net.*), with no DDP (module.) or torch.compile (_orig_mod.) wrapper in them
    assert all(name.startswith("model.net.") and "_orig_mod." not in name for name in model_weights(checkpoint, "raw"))
