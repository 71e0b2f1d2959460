"""whmae-pretrain / whmae-finetune command lines: help, usage mistakes, one-line errors."""

from __future__ import annotations

import errno

import pytest

from whmae import cli, finetune, pretrain

CONFIG = "configs/pretrain.py:tiny"


def _exit(main, args, capsys):
    """(exit code, stdout, stderr) of main(args); the SystemExit message counts as stderr."""
    with pytest.raises(SystemExit) as caught:
        main(args)
    out, err = capsys.readouterr()
    code = caught.value.code
    if isinstance(code, str):
        return 1, out, err + code
    return code or 0, out, err


@pytest.mark.parametrize("main", [pretrain.main, finetune.main])
def test_help_exits_zero_and_lists_config_fields_with_defaults(main, capsys):
    code, out, _ = _exit(main, ["--help"], capsys)
    assert code == 0
    assert "--workdir" in out and "--config=FILE" in out
    assert "--config.train.steps=" in out and "--config.data.dir=''" in out


def test_help_lists_the_given_config(capsys):
    code, out, _ = _exit(pretrain.main, ["--config", "configs/pretrain.py:paper", "-h"], capsys)
    assert code == 0 and "configs/pretrain.py:paper" in out
    assert "--config.model.width=1025" in out


@pytest.mark.parametrize("main", [pretrain.main, finetune.main])
def test_missing_config_file_is_one_line(main, tmp_path, capsys):
    args = ["--config", "configs/nope.py:tiny", "--workdir", str(tmp_path)]
    code, _, err = _exit(main, args, capsys)
    assert code == 1
    assert (
        err.strip()
        == "error: --config: no such file 'configs/nope.py' (from 'configs/nope.py:tiny')"
    )


def test_typo_in_a_config_field_names_it_and_the_closest(tmp_path, capsys):
    args = ["--config", CONFIG, "--workdir", str(tmp_path), "--config.train.stepz=3"]
    code, _, err = _exit(pretrain.main, args, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "config.train has no field 'stepz'" in err and "--config.train.steps?" in err
    args = ["--config", CONFIG, "--workdir", str(tmp_path), "--config.trian.steps=3"]
    code, _, err = _exit(pretrain.main, args, capsys)
    assert code == 1 and "did you mean --config.train?" in err


def test_negative_steps_blame_train_steps_not_warmup(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    args = [
        "--config", CONFIG, "--workdir", str(tmp_path / "w"),
        f"--config.data.dir={data}", "--config.train.steps=-5",
    ]  # fmt: skip
    code, _, err = _exit(pretrain.main, args, capsys)
    assert code == 1
    assert err.strip() == "error: train.steps=-5 must be an integer >= 1"
    assert not (tmp_path / "w").exists()  # stopped before anything was made


def test_data_dir_that_is_a_file_is_called_a_file(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("x")
    args = ["--config", CONFIG, "--workdir", str(tmp_path / "w"), f"--config.data.dir={data}"]
    code, _, err = _exit(pretrain.main, args, capsys)
    assert code == 1 and "is a file, not a dataset directory" in err
    assert "does not exist" not in err and len(err.strip().splitlines()) == 1


def test_disk_full_is_one_line_naming_the_last_good_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "50").mkdir(parents=True)
    (tmp_path / "checkpoints" / "60.orbax-checkpoint-tmp-123").mkdir()
    cause = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    with pytest.raises(SystemExit) as caught, cli.one_line_errors(str(tmp_path)):
        try:
            raise cause
        except OSError as e:
            raise RuntimeError("wrapped by a library") from e
    line = caught.value.code
    assert isinstance(line, str) and "\n" not in line
    assert line.startswith("error: disk full") and "metrics.jsonl" in line
    assert f"step 50 in {tmp_path / 'checkpoints'}" in line


def test_other_errors_keep_their_traceback(tmp_path):
    with pytest.raises(KeyError), cli.one_line_errors(str(tmp_path)):
        raise KeyError("a bug")


def test_a_dataset_the_model_does_not_take_is_named_before_anything_is_built(
    tiny_dataset, tmp_path, capsys
):
    """A 32x32 dataset with a 64x64 model (and a frame count that differs) fails at once,
    naming the config fields and the dataset's values, instead of ~20 s later in XLA."""
    args = [
        "--config", CONFIG, "--workdir", str(tmp_path / "w"), f"--config.data.dir={tiny_dataset}",
        "--config.model.image_size=64", "--config.model.frames=20",
    ]  # fmt: skip
    code, _, err = _exit(pretrain.main, args, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "model.image_size=64 (dataset: 32)" in err and "model.frames=20 (dataset: 10)" in err
    assert not (tmp_path / "w").exists()
    finetune_args = [
        "--config", "configs/segmentation.py:tiny,unetr_scratch", "--workdir",
        str(tmp_path / "f"), f"--config.data.dir={tiny_dataset}",
        "--config.model.encoder.image_size=64",
    ]  # fmt: skip
    code, _, err = _exit(finetune.main, finetune_args, capsys)
    assert code == 1 and "model.encoder.image_size=64 (dataset: 32)" in err


def test_a_batch_that_does_not_split_over_the_devices_names_the_field():
    cli.check_batch_splits(16, 8)
    with pytest.raises(cli.UsageError, match=r"data.batch_size=12 does not split .* 8 data"):
        cli.check_batch_splits(12, 8)


def test_resuming_with_a_changed_model_names_the_changed_fields(tiny_dataset, tmp_path, capsys):
    """A workdir trained with one model and resumed with another: one line naming each
    changed model field and its checkpoint value, not Orbax's shape error."""
    base = ["--config", CONFIG, "--workdir", str(tmp_path / "w"),
            f"--config.data.dir={tiny_dataset}", "--config.train.steps=2",
            "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
            "--config.optim.warmup_steps=1"]  # fmt: skip
    code, _, _ = _exit(pretrain.main, base, capsys)
    assert code == 0
    code, _, err = _exit(pretrain.main, [*base, "--config.model.mlp_dim=96",
                                         "--config.train.steps=4"], capsys)  # fmt: skip
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "model.mlp_dim=96 (checkpoint: 64)" in err and "step 2" in err
