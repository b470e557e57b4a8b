"""Flags generated from the config dataclasses: one per field, help from the field's comment,
defaults from the dataclass, configs built back the same way for every command."""

from __future__ import annotations

import dataclasses

import pytest

from tailforge.cli import all_commands, main
from tailforge.cli.commands import CommandParser
from tailforge.cli.flags import config_from_args, leaf_fields
from tailforge.gen.core.checks import field_comments

CONFIG_COMMANDS = {words: command for words, command in all_commands().items() if command.config}

#: fields a command needs besides its required ones to make a valid config
VALID_EXTRA = {"eval memorization": {"shards": "S"}}


def command_parser(words: str) -> CommandParser:
    command = all_commands()[words]
    return CommandParser(prog=f"tailforge {words}", description=command.description, command=command).build()


def required_argv(parser: CommandParser) -> list[str]:
    """Every required option of `parser` with the value "1" (a valid path, name and positive count)."""
    argv = []
    for action in parser._actions:
        if action.required:
            argv += [action.option_strings[0], "1"] if action.option_strings else ["1"]
    return argv


def excluded_fields(words: str) -> dict:
    """Values for the fields a command spells with its own option (t_re, mix): the dataclass defaults."""
    command = CONFIG_COMMANDS[words]
    defaults = {name: default for name, _, default, _ in leaf_fields(command.config_class())}
    return {name: 0.5 if defaults[name] is dataclasses.MISSING else defaults[name]
            for name, flag in command.flags.items() if flag is None}


def test_every_command_has_a_config_or_its_own_options():
    assert {"gen baseline", "gen reconstruct", "gen lowdensity", "train diffusion", "train classifier",
            "train guidance", "eval density", "eval corruptions", "eval ood", "eval fidelity", "eval memorization",
            "eval emm", "demo"} <= set(CONFIG_COMMANDS)
    assert all(command.config or command.options for command in all_commands().values())


@pytest.mark.parametrize("words", sorted(CONFIG_COMMANDS))
def test_every_field_has_a_flag_with_help(words):
    parser_actions = command_parser(words)._actions
    actions = {action.dest: action for action in parser_actions}
    # a field the command spells itself (t_re, mix) has its own option of the field's name
    own = {option[2:].replace("-", "_"): action for action in parser_actions for option in action.option_strings}
    for name, _, _, comment in leaf_fields(CONFIG_COMMANDS[words].config_class()):
        assert comment, f"{words}: field {name} has no comment"
        action = actions.get(name) or own.get(name)
        assert action is not None and action.help, f"{words}: no flag with help for field {name}"


@pytest.mark.parametrize("words", sorted(CONFIG_COMMANDS))
def test_defaults_come_from_the_dataclass(words):
    """Required flags only: the config equals the one built directly from the same values."""
    command = CONFIG_COMMANDS[words]
    config_class = command.config_class()
    parser = command_parser(words)
    extra = VALID_EXTRA.get(words, {})
    args = parser.parse_args(required_argv(parser) + [f"--{k}={v}" for k, v in extra.items()])
    given = excluded_fields(words)
    built = config_from_args(config_class, args, **given)
    required = {field.name: getattr(built, field.name) for field in dataclasses.fields(config_class)
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}
    direct = config_class(**{**required, **given, **extra})
    assert built == direct


def test_help_shows_the_dataclass_default_and_the_field_comment(capsys):
    from tailforge.gen.diffusion.config import SamplingConfig

    with pytest.raises(SystemExit):
        main(["gen", "baseline", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{field_comments(SamplingConfig)['steps']} (default: {SamplingConfig().steps})" in help_text
    assert "--no-clip" in help_text and "(default: baseline)" in help_text


def test_nested_config_round_trips():
    from tailforge.gen.diffusion.config import SamplingConfig
    from tailforge.gen.jobs.config import LowDensityConfig
    from tailforge.gen.methods.config import GuidanceConfig

    parser = command_parser("gen lowdensity")
    args = parser.parse_args(["--model", "m", "--guidance", "g", "--num", "12", "--out", "o", "--sampler", "ddim",
                              "--steps", "7", "--eta", "0.5", "--no-clip", "--alpha", "0.1", "--beta", "0",
                              "--tau", "2", "--loss", "softmax", "--seed", "3", "--shard-size", "5"])
    expected = LowDensityConfig(model="m", guidance="g", num=12,
                                sampling=SamplingConfig(sampler="ddim", steps=7, eta=0.5, clip_denoised=False),
                                guide=GuidanceConfig(alpha=0.1, beta=0.0, tau=2.0, loss="softmax"), seed=3,
                                shard_size=5)
    assert config_from_args(LowDensityConfig, args) == expected


def test_nested_defaults_of_the_enclosing_config_and_renamed_flags():
    from tailforge.config import DemoConfig

    args = command_parser("demo").parse_args(["--sampling-steps", "7", "--corruptions", "all", "--severities", "2,4"])
    config = config_from_args(DemoConfig, args)
    assert config.sampling == dataclasses.replace(DemoConfig().sampling, steps=7)  # DemoConfig's own sampler
    assert config.corruptions == () and config.severities == (2, 4)


def test_tuple_flags_are_comma_separated_and_repeatable():
    from tailforge.eval.config import OODConfig

    args = command_parser("eval ood").parse_args(["--dataset", "digits", "--out", "o", "--ood", "mondrian",
                                                   "--ood", "gm,ri", "--holdout-classes", "3,5", "--no-default-sets"])
    config = config_from_args(OODConfig, args)
    assert config.ood == ("mondrian", "gm", "ri") and config.holdout_classes == (3, 5) and not config.default_sets


def test_bool_flags_keep_their_spelling():
    from tailforge.train.config import ClassifierTrainConfig, DiffusionTrainConfig

    args = command_parser("train diffusion").parse_args(["--out", "o", "--unconditional", "--schedule", "cosine"])
    config = config_from_args(DiffusionTrainConfig, args)
    assert not config.class_conditional and config.beta_schedule == "cosine" and config.hflip is None
    args = command_parser("train classifier").parse_args(["--out", "o", "--no-amp", "--exact-epochs"])
    config = config_from_args(ClassifierTrainConfig, args, mix=ClassifierTrainConfig().mix)
    assert not config.amp and not config.resample and not config.follow


@pytest.mark.parametrize("argv, expected", [
    (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--eta", "nan"], "argument --eta: expected a finite number, got 'nan'"),
    (["--eta", "inf"], "argument --eta: expected a finite number, got 'inf'"),
    (["--num", "1.5"], "argument --num: expected a positive integer, got '1.5'"),
])
def test_bad_numbers_are_one_line_argparse_errors(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["gen", "baseline", "--model", "m", "--num", "4", "--out", "o", *argv])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"tailforge gen baseline: error: {expected}"]


def test_bad_severity_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "corruptions", "--classifier", "c", "--dataset", "d", "--out", "o", "--severities", "1,6"])
    assert exit_info.value.code == 2 and "expected a severity in 1..5, got 6" in capsys.readouterr().err


def test_config_checks_its_fields_when_built_directly():
    from tailforge.gen.core.errors import ConfigError
    from tailforge.gen.diffusion.config import SamplingConfig

    with pytest.raises(ConfigError, match="steps: expected a positive integer, got 0"):
        SamplingConfig(steps=0)
    with pytest.raises(ConfigError, match="sampler: expected one of ddim, ddpm, dpmpp-2m, dpmpp-2m-karras, euler, heun, unipc, unipc-karras, "
                                           "got 'plms'"):
        SamplingConfig(sampler="plms")
