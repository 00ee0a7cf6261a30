"""The config groups mirror the code: `model=M data=D process=P` composes and builds for every process with that
process's own defaults (no other process's keys, no schedule where it takes none), the default run is the tuned
recipe, every preset composes, `module` is a group of LightningModules, the FID callback and sample.py share one
extractor configuration, and every program composes its config through config.py."""

import inspect
from pathlib import Path

import pytest
from hydra.utils import get_class, instantiate
from lightning import LightningModule
from omegaconf import OmegaConf

from diffusion_lab.builders import build_model
from diffusion_lab.config import CONFIG_DIR, compose_config

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = sorted(p.stem for p in (CONFIG_DIR / "process").glob("*.yaml"))
TINY_MODELS = {  # backbone: tiny widths
    "unet_attn": ["model.dim=8", "model.dim_mults=[1,2]", "model.attn_heads=1", "model.attn_dim_head=8"],
    "ddpm_unet": ["model.ch=16", "model.ch_mult=[1,2]", "model.norm_groups=8", "model.attn_levels=[1]"],
}
PAIRS = [("unet_attn", "fashion_mnist"), ("ddpm_unet", "cifar10")]
NO_DIFFUSION = ("autoencoder", "classifier")  # modules that train a network alone


def compose_train(overrides: list[str]):
    return compose_config("train", overrides)


def option_keys(group: str, option: str) -> set[str]:
    """The keys an option's own file sets (its defaults list aside)."""
    return set(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")) - {"defaults"}


@pytest.mark.parametrize("model_name, data", PAIRS)
@pytest.mark.parametrize("process", PROCESSES)
def test_model_data_process_builds_with_the_process_own_defaults(process, model_name, data):
    cfg = compose_train([f"model={model_name}", f"data={data}", f"process={process}", *TINY_MODELS[model_name]])
    assert set(cfg.process) == option_keys("process", process)  # nothing of the default run's process leaks in
    if not (CONFIG_DIR / "recipe" / f"{data}_{model_name}_{process}.yaml").is_file():  # the default run has its own
        assert list(cfg.tags) == ["dev"]  # nor its tags
    model = build_model(cfg)
    takes_betas = "betas" in inspect.signature(get_class(cfg.process._target_)).parameters
    assert (cfg.get("schedule") is not None) == takes_betas
    sampler = instantiate(cfg.sampler)
    sampler.check(*model.sampling_grid(sampler))  # the sampler the process brings fits its grid
    assert model.sample_shape == (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)


def test_default_run_is_the_tuned_fashion_mnist_recipe():
    """`python train.py` trains what it trained before `module` and `recipe` became groups: the keys that define it."""
    cfg = compose_train([])
    assert cfg.data.dataset == "fashion_mnist" and cfg.data.batch_size == 128 and cfg.data.random_flip
    assert cfg.model._target_.endswith("UnetAttn") and cfg.model.dim == 28 and list(cfg.model.dim_mults) == [1, 2, 4]
    assert cfg.process._target_ == "diffusion_lab.diffusion.gaussian.GaussianDiffusion"
    assert (cfg.process.objective, cfg.process.loss_type) == ("eps", "huber")
    assert (cfg.schedule.name, cfg.schedule.timesteps) == ("linear", 300)
    assert (cfg.schedule.beta_start, cfg.schedule.beta_end) == pytest.approx((1e-4 * 1000 / 300, 0.02 * 1000 / 300))
    assert (cfg.sampler.algorithm, cfg.sampler.steps) == ("ddpm", 300)
    assert cfg.module._target_ == "diffusion_lab.models.diffusion_module.DiffusionModule"
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.trainer.max_epochs) == ("torch.optim.Adam", 1e-3, 10)
    assert list(cfg.tags) == ["ddpm", "fashion_mnist"]
    named = compose_train(["experiment=ddpm_fashion_mnist"])
    assert OmegaConf.to_container(named) == OmegaConf.to_container(cfg)


def test_other_model_and_data_start_from_the_group_defaults():
    """`model=ddpm_unet data=cifar10` carries neither the Fashion-MNIST recipe nor its tags."""
    cfg = compose_train(["model=ddpm_unet", "data=cifar10"])
    assert (cfg.process.loss_type, cfg.schedule.timesteps, list(cfg.tags)) == ("l2", 1000, ["dev"])


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_every_preset_composes_with_a_module_of_the_group(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    module = get_class(cfg.module._target_)
    assert issubclass(module, LightningModule)
    if module.__name__ in ("AutoencoderModule", "FeatureClassifierModule"):  # nothing unused saved with the run
        assert not {"process", "schedule", "sampler"} & set(cfg)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIG_DIR / "module").glob("*.yaml")))
def test_module_group_options_are_lightning_modules(option):
    assert issubclass(get_class(OmegaConf.load(CONFIG_DIR / "module" / f"{option}.yaml")._target_), LightningModule)
    cfg = compose_train([f"module={option}"])
    diffusion_keys = {"process", "schedule", "sampler"}
    assert diffusion_keys & set(cfg) == (set() if option in NO_DIFFUSION else diffusion_keys)


def test_every_program_finds_its_config_through_the_one_helper():
    """train.py, sample.py, the `python -m` programs and the benchmarks compose through diffusion_lab/config.py alone: no other
    Hydra entry point, compose call, path to configs/ or read of CONFIG_DIR of its own; outside a source checkout
    (no configs/ beside src/) the helper ends in one line naming the install that has them."""
    from diffusion_lab import config
    from diffusion_lab.utils.errors import ConfigError

    own_mechanism = ("hydra.main(", "initialize_config_dir(", "compose(", '/ "configs"', "CONFIG_DIR")
    sources = [*ROOT.glob("*.py"), *(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    offenders = [f"{path.relative_to(ROOT)}: {needle}" for path in sources if path.relative_to(ROOT) != Path("src/diffusion_lab/config.py")
                 for needle in own_mechanism if needle in path.read_text()]
    assert not offenders
    assert config.config_option("sampler", "ddim").algorithm == "ddim"
    with pytest.raises(ConfigError, match="sampler=nope is not a sampler config; choose one of .*ddim"):
        config.config_option("sampler", "nope")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "CONFIG_DIR", ROOT / "no-configs")
        for read in (lambda: config.compose_config("train", []), lambda: config.config_option(None, "sample")):
            with pytest.raises(ConfigError, match="runs from a source checkout.*pip install -e ."):
                read()


def test_fid_callback_takes_the_extractor_options_of_sample_py():
    """configs/callbacks/fid.yaml and sample.py's metrics share one file for the extractor, real split and cache."""
    shared = set(OmegaConf.load(CONFIG_DIR / "metrics" / "common.yaml"))
    callback = compose_train(["callbacks=[default,fid]", "callbacks.fid.classifier_path=CLASSIFIER"]).callbacks.fid
    assert shared <= set(callback) and callback.classifier_path == "CLASSIFIER"
    assert set(OmegaConf.load(CONFIG_DIR / "callbacks" / "fid.yaml").fid) & shared == {"batch_size"}  # its own batch


def test_flow_maps_take_the_flow_matching_time_options_declared_once():
    """MeanFlow and Shortcut declare only their own options (and the defaults they change) and pass the time density,
    shift, time_scale and label dropout on to FlowMatching; process=meanflow|shortcut still takes each by name, and an
    unknown key is one line listing them all."""
    from diffusion_lab.builders import build_process
    from diffusion_lab.diffusion.flow_matching import FlowMatching
    from diffusion_lab.utils.errors import ConfigError

    shared = set(inspect.signature(FlowMatching).parameters)
    for process in ("meanflow", "shortcut"):
        own = set(inspect.signature(get_class(OmegaConf.load(CONFIG_DIR / "process" / f"{process}.yaml")._target_)).parameters)
        assert not (own & shared) - {"logit_mean", "time_sampling"}  # only a changed default is declared again
        built = build_process(compose_train([f"process={process}", "process.logit_std=0.5", "process.shift=2.0",
                                             "process.mode_scale=0.5", "process.cond_drop_prob=0.2"]))
        assert (built.logit_std, built.shift, built.mode_scale, built.cond_drop_prob) == (0.5, 2.0, 0.5, 0.2)
        with pytest.raises(ConfigError, match=r"process.bogus is not an option .* its options are: .*logit_std.*time_scale"):
            build_process(compose_train([f"process={process}", "+process.bogus=1"]))


def test_backbone_configs_leave_the_shape_to_the_builder():
    """A backbone's channels, image size, output channels and classes have one source, `build_net` (the data's, or
    the first stage's latents): no model config declares one, naming one is a one-line error, and an old checkpoint
    whose config declared them loads without them."""
    from diffusion_lab.builders import BUILDER_SET
    from diffusion_lab.utils.checkpoint import load_checkpoint
    from diffusion_lab.utils.errors import ConfigError

    standalone = {"autoencoder_kl", "feature_classifier"}  # trained alone; their config is their whole build
    for option in sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")):
        assert not set(BUILDER_SET) & option_keys("model", option) or option in standalone, option
    with pytest.raises(ConfigError, match="model.channels is set by the builder .* drop model.channels"):
        build_model(compose_train(["+model.channels=3"]))
    old = load_checkpoint(ROOT / "tests" / "fixtures" / "ddpm_v1.ckpt")
    assert not set(BUILDER_SET) & set(old["config"]["model"]) and old["config"]["model"]["dim"] == 8
