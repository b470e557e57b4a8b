"""`--config FILE`: YAML, TOML and JSON files of a command's config dataclass, flags over the file, one-line
errors for unknown keys and wrong types, and saved outputs fed back to reproduce them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tailforge.cli import all_commands, main
from tailforge.cli.commands import CommandParser
from tailforge.cli.flags import config_from_args
from tailforge.cli.train import classifier_config
from tailforge.gen.core.config_files import load_config
from tailforge.gen.diffusion.config import SamplingConfig
from tailforge.gen.jobs.config import BaselineConfig
from tailforge.train.config import ClassifierTrainConfig, DiffusionTrainConfig, MixSource

SAME_SETTINGS = {
    "toml": 'model = "m"\nnum = 12\nseed = 3\n[sampling]\nsampler = "ddim"\nsteps = 7\neta = 0.5\n',
    "yaml": "model: m\nnum: 12\nseed: 3\nsampling:\n  sampler: ddim\n  steps: 7\n  eta: 0.5\n",
    "json": json.dumps({"model": "m", "num": 12, "seed": 3, "sampling": {"sampler": "ddim", "steps": 7, "eta": 0.5}}),
}
EXPECTED = BaselineConfig(model="m", num=12, seed=3, sampling=SamplingConfig(sampler="ddim", steps=7, eta=0.5))


def parse(words: str, argv: list[str]):
    """The config `tailforge WORDS ARGV` runs with."""
    command = all_commands()[words]
    args = CommandParser(prog=f"tailforge {words}", command=command).parse_args(argv)
    return classifier_config(args) if words == "train classifier" else config_from_args(command.config_class(), args)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("suffix", sorted(SAME_SETTINGS))
def test_each_format_gives_the_same_config(tmp_path, suffix):
    path = write(tmp_path, f"job.{suffix}", SAME_SETTINGS[suffix])
    assert parse("gen baseline", ["--config", path, "--out", "o"]) == EXPECTED
    assert load_config(BaselineConfig, path) == EXPECTED


def test_flags_override_the_file_and_the_file_fills_required_flags(tmp_path):
    path = write(tmp_path, "job.toml", SAME_SETTINGS["toml"])
    config = parse("gen baseline", ["--steps", "9", "--config", path, "--num", "20", "--out", "o"])
    assert config.num == 20 and config.sampling == SamplingConfig(sampler="ddim", steps=9, eta=0.5)
    assert config.model == "m" and config.seed == 3


def test_a_partial_nested_table_keeps_the_enclosing_default(tmp_path):
    from tailforge.config import DemoConfig

    path = write(tmp_path, "demo.yaml", "sampling:\n  steps: 7\n")
    config = parse("demo", ["--config", path])
    assert config.sampling == SamplingConfig(sampler=DemoConfig().sampling.sampler, steps=7)


@pytest.mark.parametrize("text, message", [
    ('model = "m"\nnum = 12\nnmu = 3\n', "unknown setting 'nmu'; BaselineConfig has "),
    ('model = "m"\nnum = 12\n[sampling]\nstep = 3\n', "unknown setting 'sampling.step'; SamplingConfig has "),
    ('model = "m"\nnum = "twelve"\n', "num: expected an integer, got 'twelve'"),
    ('model = "m"\nnum = 0\n', "num: expected a positive integer, got 0"),
    ('model = "m"\nnum = 4\n[sampling]\nsampler = "plms"\n', "sampling.sampler: expected one of "),
    ('model = "m"\nnum = 4\nsampling = 3\n', "sampling: expected a table of SamplingConfig settings, got 3"),
    ('model = "m"\nnum = [4\n', "not valid TOML"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(tmp_path, capsys, text, message):
    path = write(tmp_path, "job.toml", text)
    with pytest.raises(SystemExit) as exit_info:
        parse("gen baseline", ["--config", path, "--out", "o"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(errors) == 1
    assert f"error: {path}: " in errors[0] and message in errors[0]


def test_an_unknown_format_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse("gen baseline", ["--config", write(tmp_path, "job.ini", "x=1"), "--out", "o"])
    assert "a config file ends in .yaml, .yml, .toml, .json" in capsys.readouterr().err


def test_a_training_mix_is_a_list_of_tables_and_mix_overrides_it(tmp_path):
    path = write(tmp_path, "train.yaml", "epochs: 2\nmix:\n  - {name: real, weight: 1}\n"
                                        "  - {name: low, weight: 0.3, path: /data/low}\n")
    config = parse("train classifier", ["--config", path, "--out", "o"])
    assert config.mix == (MixSource("real", 1.0), MixSource("low", 0.3, "/data/low")) and config.epochs == 2
    config = parse("train classifier", ["--config", path, "--out", "o", "--mix", "real=1"])
    assert config.mix == (MixSource("real", 1.0),)


def test_saved_training_configs_reparse_to_an_equal_config(tmp_path):
    """A classifier's classifier.json and a model's tailforge.json keep their config under train_config,
    next to other keys (one of them, `dataset`, also a field): fed back, they give the same config."""
    from tailforge.gen.core.files import config_dict

    classifier = ClassifierTrainConfig(dataset="digits?n=64", epochs=3, mix=(MixSource("real", 1.0),
                                                                             MixSource("b", 0.5, "runs/b")))
    saved = write(tmp_path, "classifier.json", json.dumps({"model": "tinycnn", "num_classes": 10,
                                                            "train_config": config_dict(classifier)}))
    assert parse("train classifier", ["--config", saved, "--out", "o"]) == classifier
    diffusion = DiffusionTrainConfig(dataset="digits", preset="tiny", steps=5, hflip=False)
    saved = write(tmp_path, "tailforge.json", json.dumps({"dataset": "digits", "step": 5,
                                                          "train_config": config_dict(diffusion)}))
    assert parse("train diffusion", ["--config", saved, "--out", "o"]) == diffusion


def _shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_a_job_rerun_from_its_saved_job_json_writes_byte_identical_shards(tmp_path, tiny_model_dir, capsys):
    first, second = tmp_path / "first", tmp_path / "second"

    def gen(*argv):
        assert main(["gen", "baseline", "--actors", "0", "--quiet", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    gen("--model", str(tiny_model_dir), "--num", "6", "--shard-size", "4", "--steps", "2", "--sampler", "ddim",
        "--seed", "5", "--job", "toy", "--out", str(first))
    assert gen("--config", str(first / "_job.json"), "--out", str(second))["samples"] == 6
    assert _shard_hashes(first) == _shard_hashes(second) and len(_shard_hashes(first)) == 2
    saved = json.loads((first / "_job.json").read_text())
    assert json.loads((second / "_job.json").read_text()) == saved
