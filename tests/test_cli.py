"""The command line: help, errors as one line, an end-to-end run of the foundation commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tailforge.cli import all_commands, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tailforge", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_groups(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("train", "gen", "eval", "demo"))


@pytest.mark.parametrize("argv", [["train", "diffusion", "--help"], ["gen", "baseline", "--help"],
                                  ["eval", "accuracy", "--help"], ["demo", "--help"]])
def test_subcommand_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0 and "--" in capsys.readouterr().out


def test_bad_dataset_spec_is_one_line_error(tmp_path, capsys):
    assert main(["train", "diffusion", "--dataset", "cifar10:/no/such/dir", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "dataset path not found: /no/such/dir" in err and "Traceback" not in err


def test_bad_model_folder_is_one_line_error(tmp_path, capsys):
    assert main(["gen", "baseline", "--model", str(tmp_path / "none"), "--num", "4", "--out", str(tmp_path / "o")]) == 2
    assert "model folder does not exist" in capsys.readouterr().err


def test_bad_number_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gen", "baseline", "--model", "m", "--num", "-3", "--out", "o"])
    assert exit_info.value.code == 2 and "positive integer" in capsys.readouterr().err


@pytest.mark.slow  # trains, generates and evaluates through the CLI: the full tier only
def test_train_generate_evaluate_end_to_end(tmp_path):
    model, clf, shards = tmp_path / "model", tmp_path / "clf", tmp_path / "shards"
    result = run_cli("train", "diffusion", "--dataset", "digits?n=64", "--out", str(model), "--steps", "3",
                     "--batch-size", "8", "--quiet")
    assert result.returncode == 0, result.stderr
    result = run_cli("gen", "baseline", "--model", str(model), "--num", "12", "--steps", "3", "--sampler", "ddim",
                     "--out", str(shards), "--shard-size", "5", "--actors", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == 12
    result = run_cli("train", "classifier", "--dataset", "digits?n=64", "--out", str(clf), "--epochs", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    result = run_cli("eval", "accuracy", "--classifier", str(clf), "--dataset", f"shards:{shards}", "--split", "train")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n"] == 12 and 0 <= report["top1"] <= 1 and len(report["per_class"]) == 10


#: what `--help` must not import: each costs seconds (torch alone 1.7 s on the 2-core CPU)
HEAVY_MODULES = {"torch", "torchvision", "diffusers", "timm", "ray", "webdataset"}


@pytest.mark.parametrize("words", ["", *sorted(all_commands())])
def test_every_help_imports_no_heavy_library(words):
    """Every command's options come from torch-free config modules (gen/*/config.py, train/config.py,
    eval/config.py, config.py), so `--help` answers at once."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "tailforge", *words.split(), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: tailforge" in result.stdout, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & HEAVY_MODULES, f"tailforge {words} --help imports {sorted(imported & HEAVY_MODULES)}"


def test_stdout_is_one_json_document_and_people_read_stderr(tmp_path, tiny_model_dir, capsys):
    """The output rule (docs/formats.md, "Output"): a command's stdout is its result as one JSON document
    and nothing else, whether it succeeds or finds a problem; progress and messages go to stderr."""
    shards = tmp_path / "shards"
    assert main(["gen", "baseline", "--model", str(tiny_model_dir), "--num", "4", "--shard-size", "2", "--steps",
                 "2", "--actors", "0", "--out", str(shards)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["samples"] == 4 and "gen baseline" in out.err  # the progress bar
    assert main(["shards", "verify", str(shards)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    first = sorted(shards.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[:-512])
    assert main(["shards", "verify", str(shards), "--json", str(tmp_path / "verify.json")]) == 1
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["ok"] is False and report == json.loads((tmp_path / "verify.json").read_text())
    assert "problem(s)" in out.err
