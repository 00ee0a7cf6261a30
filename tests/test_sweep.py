"""`python -m diffusion_lab.sweep`: one run's grid of EMA length x guidance scale x interval, each point scored by FD
in the shipped classifier's features, written as it goes and resumed, the best named."""

import json

import numpy as np
import pytest

from conftest import compose_train, needs_fashion_mnist, run_script
from test_pipeline import compose_sample

from diffusion_lab.sample import sample


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    """A tiny run on real Fashion-MNIST with post-hoc EMA snapshots at steps 2, 4 and 6."""
    from diffusion_lab.train import train

    output_dir = tmp_path_factory.mktemp("run")
    cfg = compose_train(["callbacks=[default,posthoc_ema]", "callbacks.posthoc_ema.every_n_steps=2",
                         "callbacks.posthoc_ema.sigma_rels=[0.05,0.2]", "trainer.max_steps=6",
                         "trainer.val_check_interval=6", "callbacks.sample_media=null"], output_dir)
    train(cfg)
    return output_dir


SWEEP = ["num_samples=40", "batch_size=40", "sampler=ddim", "steps=3", "seed=5"]


@needs_fashion_mnist
@pytest.mark.slow  # a tiny training run and eight points of 40 samples: about 2 minutes on 2 cores
def test_sweep_scores_the_grid_resumes_and_names_the_best(snapshot_run, tmp_path, one_thread):
    out = tmp_path / "sweep"
    args = ["-m", "diffusion_lab.sweep", str(snapshot_run), f"out={out}", "emas=[ema,0.2]", "guidance_scales=[1,2]",
            "intervals=[null,[0.15,100]]", "guide=step:4@0.05", *SWEEP]
    run_script(args[0], args[1:])
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # w = 1 has no interval: 2 EMAs x (w=1, w=2 everywhere, w=2 on the interval)
    assert {(r["ema"], r["guidance_scale"], json.dumps(r["interval"])) for r in results} == {
        (e, w, i) for e in ("ema", 0.2) for w, i in ((1.0, "null"), (2.0, "null"), (2.0, "[0.15, 100]"))}
    evaluations = {(r["ema"], r["guidance_scale"], json.dumps(r["interval"])): r["network_evaluations"] for r in results}
    assert evaluations["ema", 1.0, "null"] == 3 and evaluations["ema", 2.0, "null"] == 6
    assert 3 < evaluations["ema", 2.0, "[0.15, 100]"] < 6  # the guide runs only inside the interval
    best = json.loads((out / "best.json").read_text())
    assert best["fd"] == min(r["fd"] for r in results)
    assert len((out / "table.md").read_text().splitlines()) == 2 + len(results)
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

    # the (ema, w = 1) point is what sample.py scores for the same seed and samples
    paths = sample(compose_sample([f"ckpt_path={snapshot_run}/checkpoints/last.ckpt", "num_samples=40",
                                   "batch_size=40", "sampler=ddim", "sampler.steps=3", "seed=5", "metrics=[fid]", "device=cpu",
                                   f"output_dir={tmp_path / 'plain'}"]))
    assert json.loads(paths["metrics"].read_text())["fid"] == pytest.approx(
        next(r["fd"] for r in results if r["ema"] == "ema" and r["guidance_scale"] == 1), rel=1e-6)

    # a rerun finds every point done; other options are one line
    again = run_script(args[0], args[1:])
    assert "FD" not in again.stdout.split("best:")[0]
    other = run_script(args[0], [*args[1:], "num_samples=41"], check=False)
    assert other.returncode == 2 and "num_samples" in other.stderr and "Traceback" not in other.stderr


@pytest.mark.parametrize("argument, words", [
    ("emas=[fast]", "is not `ema`, `raw` or a sigma_rel"),
    ("guidance_scales=2", "must be a non-empty list"),
    ("colour=red", "expected one of"),
])
def test_bad_sweep_options_are_one_line(argument, words, tmp_path):
    result = run_script("-m", ["diffusion_lab.sweep", str(tmp_path), f"out={tmp_path / 'o'}", argument], check=False)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
