import pytest

from pipeline.config import ConfigError, load_config


def test_experiment_inherits_base_and_overrides_only_what_changes():
    cfg = load_config("hash_16bit.yaml")
    assert cfg.model.bits == 16 and cfg.model.kind == "hash"  # from hash_16bit <- hash_64bit
    assert cfg.data.batch_size == 128 and cfg.optim.lr == pytest.approx(1e-3)  # from base.yaml
    assert cfg.run.name == "hash_16bit"


def test_every_shipped_config_loads():
    for name in ["base", "hash_16bit", "hash_32bit", "hash_64bit", "hash_128bit", "fine_grained",
                 "coco_hash_64bit", "coco_fine_grained", "f30k_hash_64bit", "f30k_fine_grained",
                 "coco_hash_64bit_features"]:
        cfg = load_config(f"{name}.yaml")
        assert cfg.model.bits % 8 == 0


def test_key_value_overrides_typed():
    cfg = load_config("fine_grained", ["optim.lr=3e-4", "model.embed_dim=64", "run.name=x", "data.root=/d"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.model.embed_dim == 64
    assert cfg.run.name == "x" and cfg.data.root == "/d"


def test_config_by_path_with_relative_base(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: hash_64bit.yaml\nmodel: {bits: 32}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\noptim: {lr: 0.01}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.model.bits == 32 and cfg.optim.lr == pytest.approx(0.01) and cfg.model.kind == "hash"


@pytest.mark.parametrize("overrides, fragment", [
    (["optim.lrr=0.1"], "did you mean 'optim.lr'"),
    (["modle.bits=8"], "did you mean 'model'"),
    (["model.bits=abc"], "model.bits"),
    (["model.bits=60"], "positive multiple of 8"),
    (["model.bits=0"], "positive multiple of 8"),
    (["model.kind=hashing"], "allowed: hash, fine_grained"),
    (["align.loss=triplet"], "infonce"),
    (["data.batch_size=1"], "data.batch_size"),
    (["optim.lr"], "key=value"),
    (["model.image_encoder.init=/no/such/weights.pt"], "no such file"),
    (["model.image_encoder.name=google/vit-base-patch16-224"], "model.image_encoder.init"),
    (["model.text_encoder.init=shapes"], "model.text_encoder.init"),
    (["model.image_encoder.init_steps=0"], "model.image_encoder.init_steps"),
    (["trainer.precision=bf17"], "trainer.precision"),
    (["trainer.devices=0"], "trainer.devices"),
    (["trainer.devices=[0,-1]"], "trainer.devices"),
    (["trainer.devices=[0,0]"], "trainer.devices"),
    (["trainer.devices=1,1"], "trainer.devices"),
    (["optim.lr=["], "override 'optim.lr=['"),
    (["data.root={a: 1"], "override 'data.root={a: 1'"),
    (["trainer.strategy=dpp"], "trainer.strategy"),
    (["trainer.accelerator=gpus"], "trainer.accelerator"),
    (["trainer.limit_val_batches=1.5"], "trainer.limit_val_batches"),
    (["base=fine_grained.yaml"], "'base' cannot be set on the command line"),
    (["run.allow_changes=[optim.lrr]"], "run.allow_changes"),
    (["run.monitor=rsum"], "run.monitor"),
    (["model.text_encoder.heads=3"], "must divide model.text_encoder.width"),
    (["hash.tau=0"], "hash.tau"),
    (["data.steps_per_epoch=0"], "data.steps_per_epoch"),
])
def test_bad_configs_fail_in_one_line_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("hash_64bit.yaml", overrides)
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_missing_config_and_loop(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_experiment.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("given, devices", [("1", 1), ("4", 4), ("-1", -1), ("auto", "auto"), ("'2'", "2"),
                                            ("0,1", "0,1"), ("[0,1]", [0, 1])])
def test_devices_as_lightning_takes_them(given, devices):
    assert load_config("hash_64bit.yaml", [f"trainer.devices={given}"]).trainer.devices == devices


def test_choice_lists_are_lightnings_own():
    """The accelerator, strategy and precision lists we check at start-up (before Lightning is imported)
    are what this Lightning accepts: an upgrade that adds or drops one fails here, not in a user's run."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    from pipeline.config import CHOICES

    precisions = {str(v) for lit in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(lit)}
    assert set(CHOICES["trainer.precision"]) == precisions
    assert set(CHOICES["trainer.strategy"]) == set(StrategyRegistry.available_strategies()) | {"auto"}
    assert set(CHOICES["trainer.accelerator"]) == set(AcceleratorRegistry.available_accelerators()) | {"auto", "gpu"}
