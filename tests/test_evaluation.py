"""Evaluation at paper standard: seed-exact generation (sample i depends only on (seed, i)), sampling over several
processes with chunked, resumable writes, shipped classifier weights and scoring any samples.npz."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torchmetrics.image.fid import FrechetInceptionDistance

from conftest import CONFIGS, compose_train, needs_fashion_mnist, run_script
from test_pipeline import compose_sample
from diffusion_lab import sample as sample_module
from diffusion_lab.builders import build_model
from diffusion_lab.diffusion.guidance import Guidance
from diffusion_lab.generate import generate
from diffusion_lab.metrics.__main__ import main as metrics_main
from diffusion_lab.metrics.evaluate import data_split
from diffusion_lab.metrics.extractors import SHIPPED_CLASSIFIERS, ClassifierFeatures, InceptionFeatures, weights_hash
from diffusion_lab.metrics.reference_stats import feature_stats, frechet_distance, read_stats, write_stats
from diffusion_lab.metrics.scores import FeatureInput
from diffusion_lab.sample import sample
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.errors import ConfigError
from tiny_run import image_folder


def tiny_checkpoint(root: Path, overrides: list[str], data: list[str] | None = None) -> tuple[nn.Module, Path]:
    """The default model shrunk (on 8x8 grayscale unless `data` chooses), randomly initialised (bit equality needs
    no training), and a checkpoint of it as train.py writes one (format 2: the model object's weights under `model.`)."""
    data = data or ["data=folder", f"data.root={image_folder(root / 'images')}", "data.image_size=8", "data.channels=1"]
    cfg = compose_train([*data, *overrides], root / "run")
    torch.manual_seed(0)
    model = build_model(cfg, trained_first_stage=False).eval()
    ckpt = root / "tiny.ckpt"
    torch.save({"config": OmegaConf.to_container(cfg, resolve=True), "format_version": 2, "global_step": 0,
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    return model, ckpt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), ["sampler=ddim", "sampler.steps=3", "sampler.eta=1.0"])


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return tiny[0]


@pytest.mark.parametrize("sampler", [Sampler("ddpm", 6), Sampler("ddim", 3, eta=1.0)], ids=str)
def test_a_sample_depends_only_on_seed_and_index(tiny_model, sampler, one_thread):
    by_3 = generate(tiny_model, sampler, 7, 3, seed=1).samples
    by_5 = generate(tiny_model, sampler, 7, 5, seed=1).samples
    assert np.array_equal(by_3, by_5)  # the same bits whatever the batch size ...
    assert np.array_equal(generate(tiny_model, sampler, 3, 2, seed=1, first=4).samples, by_3[4:])  # ... or offset
    assert not np.array_equal(generate(tiny_model, sampler, 7, 7, seed=2).samples, by_3)
    assert len({by_3[i].tobytes() for i in range(7)}) == 7  # every index its own noise


def samples_of(output_dir: Path) -> np.ndarray:
    return np.load(output_dir / "samples.npz")["arr_0"]


@pytest.mark.slow  # two processes on a 2-core CPU: about 90 s
def test_two_processes_write_the_file_of_one_with_exactly_n_samples(tiny, tmp_path):
    model, ckpt = tiny
    common = [f"ckpt_path={ckpt}", "num_samples=5", "trajectory_samples=1", "seed=3"]
    result = run_script("sample.py", [*common, "batch_size=2", "chunk_size=3", "trainer=ddp", "trainer.accelerator=cpu",
                             "trainer.devices=2", f"output_dir={tmp_path / 'two'}"])
    assert "MEMBER: 2/2" in result.stdout + result.stderr  # Lightning started two ranks
    two = samples_of(tmp_path / "two")
    assert two.shape == (5, 8, 8, 1)  # 5 does not divide over 2 ranks, nor chunks of 3 over them
    one = samples_of(Path(sample(compose_sample([*common, "batch_size=5", "device=cpu",
                                                 f"output_dir={tmp_path / 'one'}"]))["samples"]).parent)
    assert np.array_equal(two, one)
    assert np.array_equal(one, generate(model, Sampler("ddim", 3, eta=1.0), 5, 4, seed=3).samples)
    assert not (tmp_path / "two" / "chunks").exists() and (tmp_path / "two" / "trajectory.gif").is_file()


def test_a_run_stopped_after_some_chunks_resumes_to_the_same_file(tiny, tmp_path, monkeypatch, one_thread):
    _, ckpt = tiny
    common = [f"ckpt_path={ckpt}", "num_samples=5", "batch_size=2", "chunk_size=2", "device=cpu", "trajectory_samples=1"]
    whole = samples_of(sample(compose_sample([*common, f"output_dir={tmp_path / 'whole'}"]))["samples"].parent)
    calls = []

    def stop_at_the_second_chunk(*args, **kwargs):
        calls.append(kwargs["first"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while drawing samples 2..3
        return generate(*args, **kwargs)

    monkeypatch.setattr(sample_module, "generate", stop_at_the_second_chunk)
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        sample(compose_sample([*common, f"output_dir={stopped}"]))
    assert sorted(p.name for p in (stopped / "chunks").glob("*.npy")) == ["00000000.npy"]
    with pytest.raises(ConfigError, match="seed: 0 there, 1 here"):  # other arguments never mix with these chunks
        sample(compose_sample([*common, "seed=1", f"output_dir={stopped}"]))
    calls.clear()
    monkeypatch.setattr(sample_module, "generate", lambda *a, **k: calls.append(k["first"]) or generate(*a, **k))
    assert np.array_equal(samples_of(sample(compose_sample([*common, f"output_dir={stopped}"]))["samples"].parent), whole)
    assert calls == [2, 4]  # only the chunks not yet written were drawn


def test_a_finished_output_dir_is_never_replaced_and_the_same_arguments_find_it_done(tiny, tmp_path, monkeypatch,
                                                                                    one_thread):
    _, ckpt = tiny
    common = [f"ckpt_path={ckpt}", "num_samples=3", "batch_size=3", "device=cpu", "trajectory_samples=1",
              f"output_dir={tmp_path / 'out'}"]
    sample(compose_sample(common))
    (tmp_path / "out" / "metrics.json").write_text("{}")  # scores of these samples, from an earlier run
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    for other in ("seed=1", "num_samples=4", "weights=raw", "sampler.steps=2", "clip_denoised=false"):
        with pytest.raises(ConfigError, match="holds the samples of other arguments"):
            sample(compose_sample([*common, other]))
    calls = []
    monkeypatch.setattr(sample_module, "generate", lambda *a, **k: calls.append(k["first"]) or generate(*a, **k))
    assert sample(compose_sample(common))["samples"] == tmp_path / "out" / "samples.npz"  # done: not drawn again
    assert calls == [] and {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before


def test_guided_class_conditional_samples_are_the_same_in_chunks(tmp_path, one_thread):
    model, ckpt = tiny_checkpoint(tmp_path, ["data.conditional=true", "sampler=ddpm", "sampler.steps=4"])
    out = sample(compose_sample([f"ckpt_path={ckpt}", "num_samples=5", "batch_size=2", "chunk_size=3", "device=cpu",
                                 "class_labels=[1,0]", "guidance_scale=2.0", f"output_dir={tmp_path / 'out'}"]))
    direct = generate(model, Sampler("ddpm", 4), 5, 5, class_labels=[1, 0], guidance=Guidance(2.0))
    assert np.array_equal(samples_of(out["samples"].parent), direct.samples)


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    """One real-features cache for the module (its files are keyed by extractor and data hashes)."""
    return tmp_path_factory.mktemp("features")


def fashion_mnist_args(tmp_path: Path, cache: Path | None = None) -> list[str]:
    return ["data=fashion_mnist", f"metrics.cache_dir={cache or tmp_path / 'cache'}", f"paths.data_dir={tmp_path / 'data'}"]


def test_the_frechet_distance_of_statistics_is_torchmetrics_fid_of_the_features():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(400, 8, generator=generator), 0.8 * torch.randn(300, 8, generator=generator) + 0.3
    fid = FrechetInceptionDistance(feature=FeatureInput(8))
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    ours = frechet_distance(*feature_stats(fake), *feature_stats(real))
    assert ours == pytest.approx(float(fid.compute()), rel=1e-6)


def test_a_reference_file_of_another_extractor_is_refused_in_one_line(tmp_path):
    path = tmp_path / "ref.npz"
    write_stats(path, torch.randn(20, 4), "classifier", "0123456789abcdef")
    stats = np.load(path)
    assert stats["mu"].shape == (4,) and stats["sigma"].shape == (4, 4) and stats["sigma"].dtype == np.float64
    assert read_stats(path, "classifier", "0123456789abcdef")[0].shape == (4,)
    with pytest.raises(ConfigError, match="extractor classifier .weights 0123456789abcdef.*not of classifier"):
        read_stats(path, "classifier", "fedcba9876543210")
    np.savez(tmp_path / "evaluator.npz", mu=np.zeros(4), sigma=np.eye(4))  # a reference evaluator's: Inception
    with pytest.raises(ConfigError, match="extractor inception"):
        read_stats(tmp_path / "evaluator.npz", "classifier", "0123456789abcdef")


@pytest.mark.parametrize("samples, message", [
    (np.zeros((3, 8, 8, 1), np.uint8), r"is uint8 \(3, 8, 8, 1\); data=fashion_mnist needs uint8 \(N, 28, 28, 1\)"),
    (np.zeros((3, 28, 28, 1), np.float32), r"is float32 \(3, 28, 28, 1\)"),
    (np.zeros((0, 28, 28, 1), np.uint8), r"holds 0 sample\(s\): too few for metrics=\[fid\], which needs at least 2"),
])
def test_samples_that_do_not_fit_the_data_are_refused_in_one_line(tmp_path, capsys, samples, message):
    np.savez(tmp_path / "samples.npz", samples)
    with pytest.raises(SystemExit) as stop:
        metrics_main([str(tmp_path / "samples.npz"), *fashion_mnist_args(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err


@needs_fashion_mnist
def test_the_shipped_classifier_loads_weights_only_and_scores_by_default(tmp_path, feature_cache):
    path = SHIPPED_CLASSIFIERS["fashion_mnist"]
    record = torch.load(path, weights_only=True)
    assert path.stat().st_size < 2 * 2**20
    extractor = ClassifierFeatures(str(path))
    line = next(line for line in (path.parent / "README.md").read_text().splitlines() if path.name in line)
    assert weights_hash(extractor) in line and f"{record['feature_classifier']['test_accuracy']:.4f}" in line

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):  # 300 real test images as "samples"
        data = compose("sample.yaml", overrides=["+paths=default", "+data=fashion_mnist",
                                                 f"paths.data_dir={tmp_path}"]).data
    images, _ = data_split(data, "test")
    np.savez(tmp_path / "samples.npz", images[:300].permute(0, 2, 3, 1).numpy())
    args = [str(tmp_path / "samples.npz"), *fashion_mnist_args(tmp_path, feature_cache)]
    metrics_main([*args, f"write_ref={tmp_path / 'ref.npz'}", f"output={tmp_path / 'split.json'}"])
    metrics_main([*args, f"ref={tmp_path / 'ref.npz'}", f"output={tmp_path / 'ref.json'}"])
    split, ref = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("split", "ref"))
    assert split["protocol"]["extractor"] == "classifier"  # no classifier_path given: the shipped one
    assert split["protocol"]["extractor_hash"] == ref["protocol"]["extractor_hash"] == weights_hash(extractor)
    assert ref["fid"] == pytest.approx(split["fid"], rel=1e-4)  # torchmetrics over features = scipy over (mu, sigma)


def test_absent_inception_weights_name_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=f"looked in metrics.weights_path .null. and {tmp_path / 'hub'}.*download"):
        InceptionFeatures()


@needs_fashion_mnist
@pytest.mark.slow  # the 10,000 real test images through the classifier, unless the test above cached them
def test_sample_py_scores_fid_offline_with_the_shipped_classifier(tmp_path, feature_cache, one_thread):
    _, ckpt = tiny_checkpoint(tmp_path, ["sampler=ddim", "sampler.steps=2"], data=["data=fashion_mnist"])
    paths = sample(compose_sample([f"ckpt_path={ckpt}", "num_samples=4", "batch_size=4", "device=cpu", "metrics=[fid]",
                                   f"metrics.cache_dir={feature_cache}", f"output_dir={tmp_path / 'out'}"]))
    scores = json.loads(paths["metrics"].read_text())
    assert np.isfinite(scores["fid"]) and scores["protocol"]["num_samples"] == 4
    assert scores["protocol"]["extractor_hash"] == weights_hash(ClassifierFeatures(str(SHIPPED_CLASSIFIERS["fashion_mnist"])))
