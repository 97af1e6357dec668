"""Config: defaults reproduce the paper; bad values fail with a message naming the field."""

import pytest
import yaml

from volumefusion import config
from volumefusion.config import ConfigError


def test_defaults_are_the_paper_settings():
    cfg = config.load()
    assert cfg.data.crop_size == (64, 128, 128)
    assert cfg.fusion.num_classes == 5 and cfg.fusion.num_boxes == (10, 40)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adam", 1e-3, 1e-5)
    assert (cfg.optim.step_size, cfg.optim.gamma, cfg.run.max_steps) == (50000, 0.5, 400000)
    assert cfg.model.feature_channels == (24, 48, 128, 256, 512)


def test_paper_preset_equals_defaults():
    assert config.load("pretrain_paper") == config.load()


def test_presets_ship_in_the_package_and_resolve_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no source checkout around: the package's own copies are used
    assert {"pretrain_paper", "finetune", "demo"} <= set(config.presets())
    for name in ("finetune", "finetune.yaml", "configs/finetune.yaml"):
        assert config.resolve_path(name) == config.PRESETS / "finetune.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "finetune.yaml").write_text("optim: {lr: 0.5}\n")  # a file of one's own wins
    assert config.load("configs/finetune.yaml").optim.lr == 0.5
    with pytest.raises(config.ConfigError, match="elsewhere/finetune.yaml does not exist.*bundled presets: "):
        config.load("elsewhere/finetune.yaml")


def test_override_sets_nested_field():
    cfg = config.load(overrides=["optim.lr=3e-4", "data.crop_size=[32,64,64]", "fusion.mode=grid"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.crop_size == (32, 64, 64)
    assert cfg.fusion.mode == "grid"


def test_yaml_file_then_override_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.01}, "run": {"batch_size": 2}}))
    cfg = config.load(path, ["optim.lr=0.02"])
    assert cfg.optim.lr == 0.02 and cfg.run.batch_size == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "optim.lrr: unknown field"),
        ("nosection.x=1", "nosection: unknown field"),
        ("run.max_steps=abc", "run.max_steps: expected an integer, got 'abc'"),
        ("run.max_steps=1.5", "run.max_steps: expected an integer"),
        ("run.compile=3", "run.compile: expected true or false"),
        ("run.max_steps=0", "run.max_steps: 0 is out of range; must be >= 1"),
        ("fusion.grid_foreground_ratio=1.5", "fusion.grid_foreground_ratio: 1.5 is out of range; must be <= 1"),
        ("fusion.mode=cubes", "fusion.mode: 'cubes' is not allowed; choose one of: boxes, grid"),
        ("data.crop_size=[64,128]", "data.crop_size: expected 3 values, got 2"),
        ("fusion.num_boxes=[40,10]", "fusion.num_boxes: [40, 10] must be [min, max]"),
        ("finetune.mirror_axes=[0,3]", "finetune.mirror_axes: (0, 3) is out of range; must be <= 2"),
        ("finetune.mirror_axes=[1,1]", "finetune.mirror_axes: [1, 1] names an axis twice"),
        ("model.num_heads=[3,8,16]", "model.num_heads: 3 heads do not divide 128 channels"),
        ("finetune.fold=5", "finetune.fold: 5 must be < finetune.num_folds (5)"),
        ("model.window_size=[6,4]", "model.window_size: [6, 4] has 2 values; PCT-Net needs one"),
        ("model.shifted_windows=[true,true,false,false]", "model.shifted_windows: [True, True, False, False] has 4"),
        ("model.shifted_windows=[]", "model.shifted_windows: [] has 0 values"),
        ("model.window_size=[6,0,6]", "model.window_size: (6, 0, 6) is out of range; must be >= 1"),
        ("model.shifted_windows=1", "model.shifted_windows: expected true or false, got 1"),
        ("model.window_size={a: 1}", "model.window_size: expected a list, got {'a': 1}"),
    ],
)
def test_invalid_value_names_field(override, message):
    with pytest.raises(ConfigError) as err:
        config.load(overrides=[override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_single_value_for_a_list_field_is_a_list_of_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {window_size: 4, shifted_windows: false}\nfinetune: {mirror_axes: 1}\n")
    cfg = config.load(path)
    assert (cfg.model.window_size, cfg.model.shifted_windows, cfg.finetune.mirror_axes) == ((4,), (False,), (1,))
    assert config.load(overrides=["model.window_size=4"]).model.window_size == (4,)


def test_windows_per_level_load_and_round_trip(tmp_path):
    cfg = config.load(overrides=["model.window_size=[6,6,4]", "model.shifted_windows=[true,true,false]"])
    assert cfg.model.window_size == (6, 6, 4) and cfg.model.shifted_windows == (True, True, False)
    config.save(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml") == cfg


def test_a_config_saved_before_windows_per_level_still_loads():
    old = config.to_dict(config.Config())
    old["model"]["window_size"] = 6  # how checkpoints and config files stored it
    del old["model"]["shifted_windows"]
    assert config.load(base=old) == config.load() == config.from_dict(old)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="expected section.field=value"):
        config.load(overrides=["optim.lr"])


def test_save_and_reload_round_trip(tmp_path):
    cfg = config.load(overrides=["optim.lr=2e-4", "finetune.split_file=split.json"])
    config.save(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml") == cfg


def test_cli_config_command_prints_error(capsys):
    from volumefusion.cli import main

    assert main(["config", "--set", "optim.name=lion"]) == 2
    assert "optim.name: 'lion' is not allowed" in capsys.readouterr().err
    assert main(["config", "--set", "data.crop_size=[64,128,120]"]) == 2  # training would refuse it
    assert "data.crop_size" in capsys.readouterr().err


def test_device_is_checked_with_the_config():
    with pytest.raises(ConfigError, match="run.device: 'gpu'"):
        config.load(overrides=["run.device=gpu"])
    assert config.load(overrides=["run.device=cuda:1"]).run.device == "cuda:1"


def test_demo_preset_is_not_a_run_config():
    with pytest.raises(ConfigError, match="volumefusion demo"):
        config.load("demo")


def test_quiet_goes_before_or_after_the_command_and_hides_progress_bars(monkeypatch):
    import volumefusion.log as vf_log
    from volumefusion.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["config", "-q"]).quiet and parser.parse_args(["-q", "config"]).quiet
    assert parser.parse_args(["config", "-vv"]).verbose == 2
    monkeypatch.setenv("VF_PROGRESS", "1")
    monkeypatch.setattr(vf_log, "_quiet", False)
    # setup() reconfigures the library logger (the handler list in place): give it copies to change
    monkeypatch.setattr(vf_log.logger, "handlers", list(vf_log.logger.handlers))
    monkeypatch.setattr(vf_log.logger, "level", vf_log.logger.level)
    monkeypatch.setattr(vf_log.logger, "propagate", vf_log.logger.propagate)
    assert not vf_log.progress(range(2)).disable
    vf_log.setup(-1)
    assert vf_log.progress(range(2), disable=None).disable


def test_a_command_module_that_fails_to_import_is_an_error_not_a_missing_command(monkeypatch):
    from volumefusion import cli

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "evalute"])  # a typo
    with pytest.raises(ModuleNotFoundError, match="volumefusion.commands.evalute"):
        cli.build_parser()


def test_another_commands_settings_file_is_recognised_by_its_content_wherever_it_lies(tmp_path):
    copy = tmp_path / "my_settings.yaml"
    copy.write_text((config.PRESETS / "demo.yaml").read_text())
    with pytest.raises(ConfigError, match=r"my_settings.yaml holds the settings of `volumefusion demo`.*demo -c"):
        config.load(copy)
    unnamed = tmp_path / "unnamed.yaml"  # foreign sections without a first line saying whose: the field is named
    unnamed.write_text("phantoms: {pool: 3}\n")
    with pytest.raises(ConfigError, match="phantoms: unknown field"):
        config.load(unnamed)
    own = tmp_path / "run.yaml"  # a run config may name its command too
    own.write_text("# `volumefusion pretrain` on my scans\noptim: {lr: 0.5}\n")
    assert config.load(own).optim.lr == 0.5


@pytest.mark.parametrize("override", [
    "optim.lr=nan", "optim.lr=.inf", "data.pad_value=nan", "data.hu_window=[nan,1000]", "optim.grad_clip=nan",
    "optim.gamma=inf", "optim.weight_decay=-.inf", "finetune.foreground_ratio=nan", "fusion.box_size_max=[nan,80,80]",
    "run.max_steps=.inf"])
def test_settings_take_finite_numbers_only(override):
    with pytest.raises(config.ConfigError) as error:
        config.load(overrides=[override])
    assert str(error.value).startswith(override.split("=")[0]), str(error.value)


def test_a_file_reads_numbers_as_set_does_and_refuses_a_key_given_twice(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("optim:\n  lr: 1e-3\n  weight_decay: 2E-5\n")
    cfg = config.load([good])
    assert cfg.optim.lr == config.load(overrides=["optim.lr=1e-3"]).optim.lr == 1e-3 and cfg.optim.weight_decay == 2e-5
    twice = tmp_path / "twice.yaml"
    twice.write_text("optim:\n  lr: 1e-3\nrun:\n  max_steps: 5\noptim:\n  weight_decay: 0\n")
    with pytest.raises(config.ConfigError, match=r"twice.yaml is not valid YAML: 'optim' is given twice"):
        config.load([twice])


def test_a_config_that_is_not_a_text_file_is_one_clear_line(tmp_path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x04\x95" + bytes(range(256)))
    with pytest.raises(config.ConfigError, match="is not UTF-8 text"):
        config.load([binary])
    with pytest.raises(config.ConfigError, match="is a folder; give a YAML file"):
        config.load([tmp_path])
