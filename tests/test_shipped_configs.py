"""Every shipped config starts as written: `train.py --print-config`, then each start-up check that needs no
shards (the schema and value checks, the image statistics, the tokenizer, the model built from the config,
the best-checkpoint metric and the training labels against the dataset's card, the distillation teacher),
in the order train.py runs them, for every file in configs/ and every trial of configs/sweeps/.

The hub models the real-data configs name cannot be downloaded here: tiny randomly initialised models of the
same classes (CLIPModel, ViTModel, BertModel + BertTokenizer), saved with save_pretrained, stand in for them
through the documented override of a name by a folder (`HUB`, this file's own mapping). The datasets are
described by the cards `python -m data_prep` writes for them (splits, labels, features), without shards.
An instance-level config's teacher is a fine-grained run folder written here by the pipeline's own code
(resolved config, model.json and tokenizer, a checkpoint of the built module) where the config says it is.

Each real-data config is also compared key by key with its shapes counterpart (the objective must be the
same) and each Flickr30K config with its COCO twin (only the dataset's size may change the schedule)."""
from __future__ import annotations

import contextlib
import io
import itertools
import types
from pathlib import Path

import pytest
import torch
import yaml

from data_prep import DatasetCard
from data_prep.coco_names import COCO_80
from data_prep.shapes_draw import SHAPES
from data_prep.tokenizer import train_wordpiece
from pipeline.cluster.sweep_launch import expand_command, flat_parameters, load_sweep, split_train_args
from pipeline.config import CONFIG_DIR, flat, load_config, to_dict, to_yaml
from pipeline.data import NoTokenizer, check_model_inputs
from pipeline.data.datamodule import load_tokenizer
from pipeline.training.build import build_module, complete_config, logged_metric_names, model_tokenizer
from pipeline.training.cli import main as train_main
from pipeline.training.prerequisites import check_prerequisites
from pipeline.training.run_dir import choose_monitor
from pipeline.training.run_files import save_inputs

CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
SWEEPS = sorted(p.name for p in (CONFIG_DIR / "sweeps").glob("*.yaml"))
REAL = [c for c in CONFIGS if c.startswith(("coco_", "f30k_"))]
WORDS = "a an the red green blue big small square circle star dog cat car man on in of with near left right".split()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ what stands in for the hub and the data

@pytest.fixture(scope="session")
def hub(tmp_path_factory) -> dict[str, str]:
    """Hub name -> a folder holding a tiny random model of the class that name loads (and, for BERT, its
    WordPiece tokenizer), made once per session. The image towers keep their real input size and patch
    (224 px; 32 for CLIP ViT-B/32, 16 for ViT-B/16), so that the configs' data.image_size is what they take."""
    from transformers import BertConfig, BertModel, BertTokenizer, CLIPConfig, CLIPModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    CLIPModel(CLIPConfig(vision_config={"image_size": 224, "patch_size": 32, **small},
                         text_config={"vocab_size": 64, "max_position_embeddings": 77, **small},
                         projection_dim=16)).save_pretrained(root / "clip")
    ViTModel(ViTConfig(image_size=224, patch_size=16, **small)).save_pretrained(root / "vit")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertModel(BertConfig(vocab_size=len(vocab), max_position_embeddings=512, **small)).save_pretrained(root / "bert")
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / "bert")
    return {"openai/clip-vit-base-patch32": str(root / "clip"), "google/vit-base-patch16-224-in21k": str(root / "vit"),
            "bert-base-uncased": str(root / "bert")}


HUB_KEYS = ("model.image_encoder.name", "model.text_encoder.name", "data.tokenizer")
BUILT_IN = ("cnn", "tiny_bert", "features", None)


def local_overrides(config: str, overrides: list[str], hub: dict[str, str]) -> list[str]:
    """The overrides that point each hub name of the config at its tiny stand-in (a user's `name=/models/...`)."""
    cfg = flat(to_dict(load_config(config, overrides)))
    out = []
    for key in HUB_KEYS:
        name = cfg[key]
        if name in hub:
            out.append(f"{key}={hub[name]}")
        elif name not in BUILT_IN and not str(name).startswith("open_clip:"):
            pytest.fail(f"{config}: {key}={name} names a hub model with no tiny stand-in here: add one to `hub`")
    if any(str(cfg[k]).startswith("open_clip:") for k in HUB_KEYS[:2]):
        # a tower of the real architecture with random weights (open_clip builds it offline; init is not loaded)
        pytest.importorskip("open_clip", reason="the openclip extra is not installed")
    return out


def split(images: int, captions: int, labelled: bool) -> dict:
    return {"shards": [], "num_images": images, "num_captions": captions,
            "num_without_labels": 0 if labelled else images}


@pytest.fixture(scope="session")
def cards(tmp_path_factory) -> dict:
    """data.root -> the card `python -m data_prep` writes there (sizes of the Karpathy splits; COCO labels every
    split, FiCo-ITR's Flickr30K labels only test; feature shards name their widths), without shards. The shapes
    card has a WordPiece tokenizer.json trained by data_prep, as the shapes build makes one."""
    shapes = tmp_path_factory.mktemp("shapes")
    train_wordpiece([" ".join(WORDS), "a big red circle on the left", "a small blue star near a square"],
                    shapes / "tokenizer.json", vocab_size=64)

    def card(root, name, categories, sizes, labelled, features=None, tokenizer=None):
        splits = {s: split(n, 5 * n, s in labelled) for s, n in zip(("train", "val", "test"), sizes)}
        return DatasetCard(root, name, categories, "jpg" if not features else "img.npy", tokenizer, splits, features)

    coco, f30k, every = (113287, 5000, 5000), (29000, 1014, 1000), ("train", "val", "test")
    feats = {"image_dim": 768, "text_dim": 768, "dtype": "float16", "tokens": False}
    return {
        None: card(shapes, "shapes", SHAPES, (10000, 1000, 1000), every, tokenizer="tokenizer.json"),
        "data/coco": card(Path("data/coco"), "coco", COCO_80, coco, every),
        "data/f30k": card(Path("data/f30k"), "flickr30k", COCO_80, f30k, ("test",)),
        "data/coco_features": card(Path("data/coco_features"), "coco", COCO_80, coco, every, feats),
        "data/coco_token_features": card(Path("data/coco_token_features"), "coco", COCO_80, coco, every,
                                         {**feats, "tokens": True}),
    }


# ------------------------------------------------------------------ train.py's start-up, up to the first batch

def print_config(config: str, overrides: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train_main(["--config", config, "--print-config", *overrides])
    assert code == 0, f"{config}: {err.getvalue().strip()}"
    return yaml.safe_load(out.getvalue())


def tokenizer_of(cfg, card):
    """What RetrievalDataModule hands the model: the text encoder's own, else data.tokenizer, else the card's."""
    return model_tokenizer(cfg) or (NoTokenizer() if card.features else load_tokenizer(card, cfg.data.tokenizer))


def start_up(config: str, overrides: list[str], cards: dict):
    """train.py's start-up checks in its order, each raising its one-line ConfigError / DataError; returns the
    resolved config, the monitored metric, the built module and the teacher."""
    printed = print_config(config, overrides)
    cfg = complete_config(load_config(config, overrides))
    assert printed == to_dict(cfg)  # --print-config shows what runs
    card = cards.get(cfg.data.root, "unknown")
    assert card != "unknown", f"{config}: data.root={cfg.data.root}: describe its card in `cards`"
    tok = tokenizer_of(cfg, card)
    monitor, _ = choose_monitor(cfg, card, logged_metric_names(cfg))
    teacher = check_prerequisites(cfg, types.SimpleNamespace(card=card, tokenizer=tok))
    torch.manual_seed(0)
    model = build_module(cfg, card.num_images("train"), len(tok), tok.pad_token_id or 0, load_init=False)
    check_model_inputs(card, model)
    return cfg, monitor, model, teacher


def write_teacher(run_dir: Path, config: str, overrides: list[str], cards: dict) -> None:
    """What a `train.py --config <fine-grained config>` run leaves for a student to read: its resolved
    config, model.json and tokenizer, and a checkpoint (here of the untrained module: weights change nothing
    the start-up checks)."""
    cfg = complete_config(load_config(config, overrides))
    card = cards[cfg.data.root]
    tok = tokenizer_of(cfg, card)
    module = build_module(cfg, 1, len(tok), tok.pad_token_id or 0, load_init=False)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    save_inputs(run_dir, cfg, card, tok)
    torch.save({"state_dict": module.state_dict()}, run_dir / "checkpoints" / "last.ckpt")


def teacher_config(config: str, teacher: str | None) -> str:
    """The fine-grained config whose run is the instance config's teacher: the one that writes the folder it
    names (runs/<config name>), or for a config without a default, its family's (hash_instance_64bit -> fine_grained)."""
    name = f"{Path(teacher).name}.yaml" if teacher else config.replace("hash_instance_64bit", "fine_grained")
    assert (CONFIG_DIR / name).is_file(), f"{config}: its teacher {teacher} is made by no shipped config ({name})"
    return name


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_passes_start_up_checks(config, hub, cards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a user starts train.py: relative paths (run.root, a teacher) start here
    overrides = local_overrides(config, [], hub)
    raw = load_config(config, overrides)
    if raw.model.kind == "hash" and raw.hash.objective == "instance":  # train the teacher first, as a user would
        teacher = raw.hash.instance.teacher
        source = teacher_config(config, teacher)
        run = teacher or f"runs/{source.removesuffix('.yaml')}"
        write_teacher(tmp_path / run, source, local_overrides(source, [], hub), cards)
        overrides += [] if teacher else [f"hash.instance.teacher={run}"]
    cfg, monitor, model, teacher = start_up(config, overrides, cards)
    assert monitor.startswith("val/")
    assert (teacher is not None) == (cfg.model.kind == "hash" and cfg.hash.objective == "instance")


def sweep_trials(sweep: str) -> list[tuple[str, list[str]]]:
    """(config, overrides) of each grid point; a sampled parameter at both ends of its range."""
    spec = load_sweep(CONFIG_DIR / "sweeps" / sweep)
    params = flat_parameters(spec["parameters"])
    choices = [p["values"] if "values" in p else [p["value"]] if "value" in p else [p["min"], p["max"]]
               for p in params.values()]
    return [split_train_args(expand_command(spec["command"], dict(zip(params, combo))))
            for combo in itertools.product(*choices)]


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_trial_of_a_shipped_sweep_passes_start_up_checks(sweep, hub, cards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trials = sweep_trials(sweep)
    assert len(trials) >= 2
    for config, overrides in trials:
        cfg, *_ = start_up(config, overrides + local_overrides(config, overrides, hub), cards)
        for item in overrides:  # the swept value is the one that runs
            key, value = item.split("=", 1)
            assert str(flat(to_dict(cfg))[key]) == str(yaml.safe_load(value)), (sweep, item)


# ------------------------------------------------------------------ the real-data configs against their recipes

def counterpart(config: str) -> str:
    """The shapes recipe a real-data config carries to real data: coco_hash_64bit_features -> hash_64bit."""
    name = config.split("_", 1)[1].replace("_features", "").replace("_openclip", "")
    assert (CONFIG_DIR / name).is_file(), f"{config} has no shapes counterpart {name}"
    return name


# what real data changes: backbones and their inputs, the data, the optimiser and trainer of a GPU run
DATA_AND_TRAINING = ("data.", "model.image_encoder.", "model.text_encoder.", "model.head_hidden", "optim.", "trainer.",
                     "run.", "logger.")
# objective keys the real-data configs set otherwise on purpose, with the reason in their comments
DELIBERATE = {
    "tokens.dim": "256-d token heads on 768-wide backbone tokens (the shapes recipe's 64 suits its 64-128-wide ones)",
    "hash.instance.teacher": "each dataset's own fine-grained run",
}


@pytest.mark.parametrize("config", REAL)
def test_real_data_config_keeps_its_shapes_recipes_objective(config):
    real, shapes = (flat(to_dict(load_config(c))) for c in (config, counterpart(config)))
    differ = {k: (shapes.get(k), real.get(k)) for k in sorted(set(real) | set(shapes))
              if real.get(k) != shapes.get(k) and not k.startswith(DATA_AND_TRAINING) and k not in DELIBERATE}
    assert not differ, f"{config} against {counterpart(config)} (shapes -> real): {differ}"


# Flickr30K is a quarter of COCO's size: fewer warm-up steps, more epochs, checkpoints more often
DATASET_SIZE = ("data.root", "optim.warmup_steps", "trainer.max_epochs", "trainer.ckpt_every_n_steps", "run.name",
                "hash.instance.teacher")


@pytest.mark.parametrize("config", [c for c in REAL if c.startswith("f30k_")])
def test_flickr30k_config_is_its_coco_twin_on_another_dataset(config):
    coco = config.replace("f30k_", "coco_")
    f30k, twin = (flat(to_dict(load_config(c))) for c in (config, coco))
    differ = {k: (twin.get(k), f30k.get(k)) for k in sorted(set(f30k) | set(twin))
              if f30k.get(k) != twin.get(k) and k not in DATASET_SIZE}
    assert not differ, f"{config} against {coco}: {differ}"
    assert f30k["data.root"] == "data/f30k" and twin["data.root"] == "data/coco"


@pytest.mark.slow  # two tiny train.py runs at 224 px (~1 min on 2 busy cores)
def test_instance_config_trains_after_its_fine_grained_teacher_as_written(hub, shapes_tiny, tmp_path):
    """The documented sequence on the real configs (hub names mapped, tiny data): the fine-grained run writes
    runs/coco_fine_grained, and the instance config, whose default teacher that is, starts and trains with it."""
    from tests.helpers.runs import run_train

    tiny = [f"data.root={shapes_tiny}", "data.batch_size=4", "data.eval_batch_size=16", "data.num_workers=0",
            "data.steps_per_epoch=2", "trainer.max_epochs=1", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.precision=32-true", "model.head_hidden=16", "logger.wandb=false"]
    for config in ("coco_fine_grained.yaml", "coco_hash_instance_64bit.yaml"):
        proc = run_train(["--config", config, *local_overrides(config, [], hub), *tiny], cwd=tmp_path,
                         env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, f"{config}: {proc.stderr[-3000:]}"
    saved = yaml.safe_load((tmp_path / "runs" / "coco_hash_instance_64bit" / "config.yaml").read_text())
    assert saved["hash"]["instance"]["teacher"] == "runs/coco_fine_grained"
    assert (tmp_path / "runs" / "coco_hash_instance_64bit" / "test_metrics.json").is_file()
