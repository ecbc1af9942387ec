
import pytest

from transformer.config import Config, ConfigError, from_dict, load_config, save_config, to_dict


def test_every_shipped_config_loads(root):
    """Each YAML file in configs/ maps onto the dataclasses without error."""
    files = sorted((root / "configs").glob("*.yaml"))
    assert files
    for path in files:
        assert isinstance(load_config(path), Config)


def test_file_values_and_defaults(tmp_path):
    """Fields given in the file are taken; the others keep the dataclass defaults."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  N: 3\ntrain:\n  warmup: 77\n")
    cfg = load_config(path)
    assert (cfg.model.N, cfg.train.warmup) == (3, 77)
    assert cfg.model.d_model == Config().model.d_model


def test_overrides_are_coerced_to_the_field_type():
    cfg = load_config(
        None,
        ["train.warmup=400", "train.lr_factor=2", "train.adam_betas=[0.9, 0.99]", "train.run_dir=2024",
         "train.max_steps=null", "model.tie_embeddings=true", "train.clip_grad_norm=1"],
    )
    assert cfg.train.warmup == 400
    assert cfg.train.lr_factor == 2.0 and isinstance(cfg.train.lr_factor, float)
    assert cfg.train.adam_betas == (0.9, 0.99)
    assert cfg.train.run_dir == "2024"
    assert cfg.train.max_steps is None
    assert cfg.model.tie_embeddings is True
    assert cfg.train.clip_grad_norm == 1.0


def test_exponents_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-9 as a string; a number field takes it as the number, in a file
    and in an override, while other text is still refused."""
    path = tmp_path / "eps.yaml"
    path.write_text("train:\n  adam_eps: 1e-9\n")
    assert load_config(path).train.adam_eps == 1e-9
    assert load_config(None, ["train.adam_eps=1e-6", "train.lr_factor=+2E1"]).train.lr_factor == 20.0
    with pytest.raises(ConfigError, match="'train.adam_eps' must be a number"):
        load_config(None, ["train.adam_eps=1e-"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.warmpu=400", "train.warmpu"),
        ("trian.warmup=400", "trian"),
        ("train.warmup=abc", "train.warmup"),
        ("train.warmup=1.5", "train.warmup"),
        ("model.tie_embeddings=3", "model.tie_embeddings"),
        ("model.norm=middle", "model.norm"),
        ("model.h=7", "model.h"),
        ("decode.workers=0", "decode.workers"),
        ("decode.batch_hypotheses=-5", "decode.batch_hypotheses"),
        ("decode.patience=0", "decode.patience"),
        ("train.best_metric=bleu", "train.best_metric"),
        ("train.adam_betas=[0.9]", "train.adam_betas"),
        ("data.copy.min_len=20", "data.copy.min_len"),
        ("train=5", "train"),
        ("train.cooldown=1.5", "train.cooldown"),
        ("train.tune_length_penalty=1.0", "train.tune_length_penalty"),
        ("train.tune_length_penalty=[0.6, high]", "train.tune_length_penalty[1]"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"'{key}" in str(e.value)
    assert override in str(e.value)


def test_a_list_of_any_length():
    assert load_config(None, ["train.tune_length_penalty=[0.6, 1, 1.5]"]).train.tune_length_penalty == (0.6, 1.0, 1.5)
    assert load_config(None, ["train.tune_length_penalty=[]"]).train.tune_length_penalty == ()


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  d_modle: 256\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert "bad.yaml" in message and "'model.d_modle'" in message and "model.d_model" in message


def test_wrong_type_in_file_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'train\.epochs' must be an integer"):
        load_config(path)


def test_unreadable_or_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level"):
        load_config(listy)


def test_resolved_config_round_trips(tmp_path, root):
    """What a run writes (save_config) reads back to the same Config."""
    cfg = load_config(root / "configs" / "copy.yaml", ["train.warmup=123"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert from_dict(to_dict(cfg)) == cfg
