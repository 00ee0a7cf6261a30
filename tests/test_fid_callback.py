"""The FID callback in a tiny training run: it logs val/fid (and the sample count) and writes its protocol."""

import csv
import json
import math

import pytest
import torch

from diffusion_lab.models.components.classifier import ClassifierNet
from tiny_run import image_folder, run_train, tiny_overrides


def classifier_checkpoint(path, image_size: int) -> str:
    """A feature_classifier checkpoint with random weights, as FeatureClassifierModule writes it."""
    torch.manual_seed(0)
    net = ClassifierNet(channels=1, image_size=image_size, num_labels=2, widths=(8,), feature_dim=8)
    state = {f"net.{name}": value for name, value in net.state_dict().items()}
    torch.save({"config": {}, "state_dict": state, "feature_classifier": {"net": net.config, "test_accuracy": 0.5}}, path)
    return str(path)


@pytest.mark.slow  # 15-85 s on 2 cores (pytest --durations, 2026-12-04)
def test_fid_callback_logs_val_fid_in_a_tiny_run(tmp_path):
    output_dir = tmp_path / "run"
    run_train(tiny_overrides(image_folder(tmp_path / "images"), output_dir, max_steps=4) + [
        "callbacks=[default,fid]", "callbacks.sample_media=null", "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null", "callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=10",
        "callbacks.fid.batch_size=4", f"callbacks.fid.classifier_path={classifier_checkpoint(tmp_path / 'clf.ckpt', 8)}",
        f"callbacks.fid.cache_dir={tmp_path / 'cache'}", "callbacks.fid.nll_images=3",
        "callbacks.model_checkpoint.monitor=val/fid", "callbacks.model_checkpoint.every_n_train_steps=2",
        "+callbacks.fid.sampler={_target_: diffusion_lab.samplers.Sampler, algorithm: ddim, steps: 3}",
    ], timeout=900)
    with open(output_dir / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/fid")]
    assert [int(row["step"]) for row in rows] == [2, 4]
    assert all(math.isfinite(float(row["val/fid"])) and float(row["val/fid"]) > 0 for row in rows)
    assert all(float(row["val/fid_num_samples"]) == 10 for row in rows)

    records = [json.loads(line) for line in (output_dir / "metrics" / "scores.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    protocol = records[0]["protocol"]
    assert protocol["num_samples"] == 10 and protocol["real_split"] == "test" and protocol["real_size"] == 40
    assert protocol["extractor"] == "classifier" and protocol["steps"] == 3 and protocol["weights"] == "ema"
    assert math.isclose(records[0]["fid"], float(rows[0]["val/fid"]), rel_tol=1e-6)
    assert all(r["nll_bpd"] > 0 for r in records)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # real features computed once, then read from the cache
    assert any(p.name.startswith("step_") for p in (output_dir / "checkpoints").iterdir())


def test_fid_callback_defaults_to_the_shipped_classifier_for_its_data(tmp_path):
    """classifier_path=null on Fashion-MNIST: the shipped weights, by their hash; elsewhere the one-line error."""
    import pytest
    from types import SimpleNamespace

    from diffusion_lab.callbacks.fid import FID
    from diffusion_lab.metrics.extractors import ClassifierFeatures, SHIPPED_CLASSIFIERS, weights_hash
    from diffusion_lab.utils.errors import ConfigError

    module = SimpleNamespace(run_config={"data": {"dataset": "fashion_mnist", "image_size": 28, "channels": 1}})
    callback = FID(dirpath=str(tmp_path))
    callback.setup(None, module, "fit")
    assert weights_hash(callback.scores.extractor) == weights_hash(ClassifierFeatures(str(SHIPPED_CLASSIFIERS["fashion_mnist"])))
    module.run_config["data"] = {"dataset": "cifar10", "image_size": 32, "channels": 3}
    with pytest.raises(ConfigError, match="classifier_path=null"):
        FID(dirpath=str(tmp_path)).setup(None, module, "fit")


def test_fid_callback_scores_as_sample_py_does(tmp_path, monkeypatch):
    """The same samples against the same real images give the callback's val/fid and protocol exactly as
    `score_samples` (sample.py metrics=[fid], the metrics CLI, the sweep) gives them: one code path, the callback
    building neither extractor nor real features of its own."""
    from pathlib import Path
    from types import SimpleNamespace

    import diffusion_lab.callbacks.fid as fid_module
    from diffusion_lab.callbacks.fid import FID
    from diffusion_lab.metrics.evaluate import score_samples

    generator = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=generator)
    samples = torch.randint(0, 256, (12, 8, 8, 1), dtype=torch.uint8, generator=generator).numpy()
    options = {"extractor": "classifier", "classifier_path": classifier_checkpoint(tmp_path / "clf.ckpt", 8),
               "weights_path": None, "real_split": "test", "cache_dir": str(tmp_path / "cache"), "batch_size": 5,
               "fid": {}, "kid": {"subsets": 100, "subset_size": 1000}}
    expected = score_samples(torch.from_numpy(samples).permute(0, 3, 1, 2), real, options, torch.device("cpu"))

    monkeypatch.setattr(fid_module, "generate", lambda *args, **kwargs: SimpleNamespace(samples=samples))
    callback = FID(str(tmp_path / "metrics"), num_samples=12, batch_size=5, classifier_path=options["classifier_path"],
                   cache_dir=options["cache_dir"], kid=True, sampler=SimpleNamespace(steps=1, evaluations_used=1))
    split = SimpleNamespace(images=real, labels=torch.zeros(40))
    datamodule = SimpleNamespace(setup=lambda stage: None, train_set=None, val_set=None, test_set=split)
    module = SimpleNamespace(run_config={"data": {"dataset": "folder"}}, device=torch.device("cpu"),
                             model=SimpleNamespace(conditional=False), log=lambda *args, **kwargs: None)
    trainer = SimpleNamespace(callbacks=[], global_rank=0, world_size=1, global_step=2, loggers=[], datamodule=datamodule)
    callback.setup(trainer, module, "fit")
    scores = callback.evaluate(trainer, module)
    assert scores == {name: value for name, value in expected.items() if name != "protocol"} and "kid_mean" in scores
    written = json.loads((tmp_path / "metrics" / "scores.jsonl").read_text())["protocol"]
    assert {key: written[key] for key in expected["protocol"]} == expected["protocol"]
    source = Path(fid_module.__file__).read_text()
    assert not any(name in source for name in ("real_features(", "build_extractor(", "SampleScores("))
