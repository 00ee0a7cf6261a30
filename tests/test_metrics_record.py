"""A metrics.json is never replaced: scoring again into it (sample.py metrics=[...] into a finished output_dir, or
the metrics command's output=) adds the new scores beside the ones there when the settings they share agree, keeps
every score already written, and ends in one line, changing nothing, when a setting differs."""

import json
import re

import pytest

from diffusion_lab.metrics.__main__ import main as metrics_main
from diffusion_lab.sample import sample
from diffusion_lab.utils.errors import ConfigError
from test_evaluation import tiny_checkpoint
from test_metrics import save_classifier
from test_pipeline import compose_sample


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny model's 4 samples in a finished output_dir, scored by metrics=[fid] with a classifier for 8x8 images."""
    root = tmp_path_factory.mktemp("scored")
    _, ckpt = tiny_checkpoint(root, ["sampler=ddim", "sampler.steps=2"])
    classifier = save_classifier(root / "clf.ckpt", seed=0, image_size=8)
    common = [f"ckpt_path={ckpt}", "num_samples=4", "batch_size=4", "device=cpu", f"output_dir={root / 'out'}",
              f"metrics.classifier_path={classifier}", f"metrics.cache_dir={root / 'cache'}", "metrics.real_split=val"]
    path = sample(compose_sample([*common, "metrics=[fid]"]))["metrics"]
    return common, path


def test_scoring_other_metrics_into_a_metrics_json_adds_them_and_keeps_the_others(scored, one_thread):
    common, path = scored
    first = json.loads(path.read_text())
    assert sample(compose_sample([*common, "metrics=[kid]"]))["metrics"] == path
    both = json.loads(path.read_text())
    assert both["fid"] == first["fid"] and "kid_mean" in both and both["protocol"].items() >= first["protocol"].items()
    data = ["data=folder", f"data.root={path.parents[1] / 'images'}", "data.image_size=8", "data.channels=1",
            "data.val_size=16"]  # the checkpoint's data (test_evaluation.tiny_checkpoint)
    options = [o for o in common if o.startswith("metrics.")]
    metrics_main([str(path.parent / "samples.npz"), *data, *options, "metrics=[prec_recall]", "metrics.prec_recall.k=2",
                  f"output={path}"])
    three = json.loads(path.read_text())
    assert {key: three[key] for key in both if key != "protocol"} == {k: v for k, v in both.items() if k != "protocol"}
    assert "precision" in three and three["protocol"]["prec_recall_k"] == 2


@pytest.mark.parametrize("other, difference", [
    ("metrics.real_split=train", "real_split: val there, train here"),
    ("metrics.kid.subsets=7", "kid_subsets: 100 there, 7 here"),
])
def test_scores_of_other_settings_are_one_line_and_change_nothing(scored, one_thread, other, difference):
    common, path = scored
    sample(compose_sample([*common, "metrics=[kid]"]))
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=re.escape(f"{path} holds scores of other settings (") + ".*" + re.escape(difference)):
        sample(compose_sample([*common, "metrics=[kid]", other]))
    assert path.read_bytes() == before
