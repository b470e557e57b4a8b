"""Bad input, one test per case: configs and CLI values, dataset specs, checkpoints, shards and
model outputs. Each case must end in a one-line error that names the file, field, value, shard
or offset (or, for --skip-bad-shards, in a counted skip); the README's table lists the same cases.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_idx import write_idx_folder

from tailforge.cli import main
from tailforge.gen.core.errors import CheckpointError, DatasetError, ShardError
from tailforge.gen.data.datasets import load_dataset
from tailforge.gen.data.shards.format import ShardRecord, encode_sample, plan_shards, sample_key
from tailforge.gen.data.shards.read import iter_samples, read_shard, shard_entries
from tailforge.gen.data.shards.verify import verify_shard_set
from tailforge.gen.data.shards.write import differing_fields, save_record, write_manifest, write_shard
from tailforge.gen.models.classifiers import create_classifier, load_classifier, save_classifier
from tailforge.gen.models.diffusion import load_diffusion_model

REPO = Path(__file__).resolve().parents[1]
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


# ------------------------------------------------------------------------------------------------
# helpers


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in-process; a user error is exit status 2 and exactly one line, no traceback."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def argparse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def make_set(root: Path, shards: int = 3, per_shard: int = 4, job: str = "set") -> Path:
    """A small valid shard set (records + manifest) of random 8x8 images; no model needed."""
    rng = np.random.default_rng(0)
    records = []
    for spec in plan_shards(job, shards * per_shard, per_shard, seed=0):
        samples = [encode_sample(sample_key(job, i), rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), i % 10, {"i": i})
                   for i in spec.indices]
        sha256, size = write_shard(root, spec, samples)
        record = ShardRecord(name=spec.name, index=spec.index, start=spec.start, count=spec.count, sha256=sha256,
                             size_bytes=size, seconds=0.0, model_evals=0, worker="test")
        save_record(root, record)
        records.append(record)
    write_manifest(root, records, extra={"num_classes": 10, "class_names": list("0123456789")})
    return root


def rewrite_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def model_copy(tiny_model_dir, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / name))


def poison_model(folder: Path, value: float) -> Path:
    """Set the U-Net's output bias to NaN or Inf, so every model evaluation is non-finite."""
    state = load_file(folder / UNET_WEIGHTS)
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], value)
    save_file(state, folder / UNET_WEIGHTS)
    return folder


def baseline_argv(model, out, *extra: str) -> list[str]:
    return ["gen", "baseline", "--model", str(model), "--num", "6", "--steps", "2", "--shard-size", "3",
            "--actors", "0", "--out", str(out), "--quiet", *extra]


# ------------------------------------------------------------------------------------------------
# configs and CLI values


@pytest.mark.parametrize("flag,value,expected", [
    ("--num", "0", "expected a positive integer, got 0"),
    ("--steps", "ten", "expected a positive integer, got 'ten'"),
    ("--shard-size", "-5", "expected a positive integer, got -5"),
    ("--seed", "-1", "expected an integer >= 0, got -1"),
    ("--sampler", "plms", "invalid choice: 'plms'"),
])
def test_cli_value_rejected_by_the_parser(capsys, flag, value, expected):
    argv = ["gen", "baseline", "--model", "m", "--num", "4", "--out", "o"]
    argv += [flag, value]
    assert expected in argparse_error(capsys, *argv)


@pytest.mark.parametrize("job,expected", [("../evil", "job name '../evil'"), ("run.v2", "job name 'run.v2'")])
def test_job_name_that_would_break_paths_or_keys(capsys, tiny_model_dir, tmp_path, job, expected):
    assert expected in cli_error(capsys, *baseline_argv(tiny_model_dir, tmp_path / "out", "--job", job))


def test_output_folder_is_a_file(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    assert "cannot use" in cli_error(capsys, *baseline_argv(tiny_model_dir, tmp_path / "out"))


def test_output_folder_holds_a_different_job(capsys, tiny_model_dir, tmp_path):
    assert main(baseline_argv(tiny_model_dir, tmp_path / "out")) == 0
    capsys.readouterr()
    err = cli_error(capsys, *baseline_argv(tiny_model_dir, tmp_path / "out", "--seed", "9"))
    assert "already holds a different job (fields that differ: seed)" in err


def test_demo_given_a_diffusion_model_it_cannot_use(capsys, tiny_model_dir, tmp_path):
    # refused before any stage runs: the demo's folder stays empty
    demo = ["demo", "--out", str(tmp_path / "demo"), "--diffusion-model"]
    assert "model folder does not exist" in cli_error(capsys, *demo, str(tmp_path / "none"))
    assert "trained with label dropout" in cli_error(capsys, *demo, str(tiny_model_dir))
    not_dropout = json.loads((tiny_model_dir / "tailforge.json").read_text())
    dropout_model = tmp_path / "dropout"
    shutil.copytree(tiny_model_dir, dropout_model)
    (dropout_model / "tailforge.json").write_text(json.dumps({**not_dropout, "null_class": 10, "image_size": 16}))
    err = cli_error(capsys, *demo, str(dropout_model))
    assert "its images (16 px, 1 channels, 10 classes) differ from those of dataset 'digits' (8 px" in err
    rng = np.random.default_rng(0)
    write_idx_folder(tmp_path / "idx", {"train": rng.integers(0, 256, (6, 4, 4)), "test": rng.integers(0, 256, (3, 4, 4))},
                     {"train": np.arange(6) % 3, "test": np.arange(3)}, gz=False)
    spec = f"mnist:{tmp_path / 'idx'}"
    err = cli_error(capsys, "demo", "--out", str(tmp_path / "demo"), "--reference-dataset", spec)
    assert f"reference_dataset {spec!r}: its images (4 px, 1 channels, 3 classes) differ" in err
    assert not (tmp_path / "demo").exists()


def test_corrupt_job_file_in_output_folder(capsys, tiny_model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_job.json").write_text("{not json")
    assert "_job.json is not valid JSON" in cli_error(capsys, *baseline_argv(tiny_model_dir, tmp_path / "out"))


def test_output_url_with_unknown_protocol(capsys, tiny_model_dir):
    assert "nosuchproto://bucket/set" in cli_error(capsys, *baseline_argv(tiny_model_dir, "nosuchproto://bucket/set"))


# ------------------------------------------------------------------------------------------------
# dataset specs


@pytest.mark.parametrize("spec,expected", [
    ("cifar100", "unknown dataset 'cifar100'"),
    ("cifar10:/no/such/dir", "dataset path not found: /no/such/dir"),
    ("digits?n=abc", "option n='abc' in dataset spec 'digits?n=abc' is not an integer"),
    ("digits?n=0", "must be >= 1"),
    ("digits?n=5000", "exceeds the 1437 training images"),
    ("digits?colour=red", "unknown option(s) ['colour']"),
    ("digits:/tmp", "takes no path"),
    ("digits?n=1&n=2", "option 'n' given twice"),
    ("mondrian?channels=2", "channels=2 in dataset spec 'mondrian?channels=2' must be 1 or 3"),
])
def test_dataset_spec(spec, expected):
    with pytest.raises(DatasetError) as err:
        load_dataset(spec)
    assert expected in str(err.value)


def test_shard_dataset_without_manifest(tmp_path):
    with pytest.raises(ShardError, match="shard manifest not found: .*_info.json"):
        load_dataset(f"shards:{tmp_path}")


def test_shard_manifest_without_splits(tmp_path):
    (tmp_path / "_info.json").write_text(json.dumps({"num_classes": 10}))
    with pytest.raises(ShardError, match="has no 'splits'"):
        load_dataset(f"shards:{tmp_path}")


def test_shard_manifest_pointing_outside_the_folder(tmp_path):
    (tmp_path / "_info.json").write_text(json.dumps(
        {"splits": {"train": {"name": "train", "num_samples": 1, "filenames": ["../../etc/x.tar"]}}}))
    with pytest.raises(ShardError, match="names a shard outside the folder"):
        load_dataset(f"shards:{tmp_path}")


def test_shard_dataset_option_not_a_number(tmp_path):
    make_set(tmp_path)
    with pytest.raises(DatasetError, match="skip_bad_shards='maybe'.*is not an integer"):
        load_dataset(f"shards:{tmp_path}?skip_bad_shards=maybe")


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_model_folder_missing(capsys, tmp_path):
    assert "model folder does not exist" in cli_error(capsys, *baseline_argv(tmp_path / "none", tmp_path / "o"))


def test_model_folder_without_unet(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError, match="is not a diffusion model folder"):
        load_diffusion_model(tmp_path / "m")


class _Payload:
    """A pickle that would create a file when unpickled: what loading untrusted pickles allows."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


def test_pickled_model_weights_are_never_unpickled(tiny_model_dir, tmp_path):
    folder = model_copy(tiny_model_dir, tmp_path)
    (folder / UNET_WEIGHTS).unlink()
    marker = tmp_path / "pwned"
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="pickled weights are not loaded"):
        load_diffusion_model(folder)
    assert not marker.exists()


def test_truncated_model_weights(tiny_model_dir, tmp_path):
    folder = model_copy(tiny_model_dir, tmp_path)
    weights = folder / UNET_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot load the U-Net"):
        load_diffusion_model(folder)


def test_corrupt_model_metadata(tiny_model_dir, tmp_path):
    folder = model_copy(tiny_model_dir, tmp_path)
    (folder / "tailforge.json").write_text("{")
    with pytest.raises(CheckpointError, match="tailforge.json is not valid JSON"):
        load_diffusion_model(folder)


def test_classifier_with_pickled_weights_only(tmp_path):
    save_classifier(tmp_path, create_classifier("tinycnn", num_classes=10, in_chans=1),
                    {"model": "tinycnn", "num_classes": 10, "in_chans": 1})
    weights = next(tmp_path.glob("*.safetensors"))
    marker = tmp_path / "pwned"
    weights.with_suffix(".pt").write_bytes(pickle.dumps(_Payload(marker)))
    weights.unlink()
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_classifier(tmp_path)
    assert not marker.exists()


def test_no_code_path_unpickles():
    """Contract behind the checkpoint cases: the package calls torch.load only with
    weights_only=True and never pickle.load/loads."""
    offenders = []
    for path in [*REPO.glob("*.py"), *(p for d in ("gen", "train", "eval") for p in (REPO / d).rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = getattr(node.func.value, "id", None)
                if owner == "pickle" and node.func.attr in ("load", "loads"):
                    offenders.append(f"{path}:{node.lineno}")
                if owner == "torch" and node.func.attr == "load" and not any(
                        k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords):
                    offenders.append(f"{path}:{node.lineno}")
    assert offenders == []


# ------------------------------------------------------------------------------------------------
# shards


def test_truncated_shard_names_shard_and_offset(tmp_path):
    root = make_set(tmp_path)
    shard = root / "set-000001.tar"
    shard.write_bytes(shard.read_bytes()[:2000])
    with pytest.raises(ShardError, match=r"shard .*set-000001.tar: .*byte offset \d+"):
        list(iter_samples(root))


def test_corrupt_tar_header_in_the_middle(tmp_path):
    """tarfile alone stops silently at a corrupt header after the first member; the reader does not."""
    root = make_set(tmp_path)
    shard = root / "set-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2048:2058] = b"\xff" * 10  # the third member's header (each member here is 512 + 512 bytes)
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"set-000000.tar: corrupt or truncated tar header at byte offset 2048"):
        read_shard(str(shard))


def test_flipped_byte_caught_by_sha256(tmp_path):
    root = make_set(tmp_path)
    entry = shard_entries(root)[2]
    data = bytearray(Path(entry.url).read_bytes())
    data[600] ^= 0x01  # inside the first member's payload: still a valid tar
    Path(entry.url).write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"set-000002.tar: sha256 .* differs from the recorded"):
        list(iter_samples(root, verify=True))


@pytest.mark.parametrize("name,expected", [("/etc/evil.png", "has an absolute path; refused"),
                                           ("../evil.png", "contains '..'; refused")])
def test_tar_member_with_unsafe_path(tmp_path, name, expected):
    shard = tmp_path / "bad.tar"
    rewrite_tar(shard, [member("ok-000.png"), member(name)])
    with pytest.raises(ShardError, match=rf"bad.tar: member .* at byte offset 1024 {expected}"):
        read_shard(str(shard))


def test_tar_member_that_is_a_link(tmp_path):
    shard = tmp_path / "bad.tar"
    rewrite_tar(shard, [member("a-000.png", kind=tarfile.SYMTYPE, link="/etc/passwd")])
    with pytest.raises(ShardError, match="'a-000.png' at byte offset 0 is a link"):
        read_shard(str(shard))


def test_same_key_in_two_shards(tmp_path):
    root = make_set(tmp_path)
    shutil.copy(root / "set-000000.tar", root / "set-000001.tar")
    report = verify_shard_set(root)
    assert not report["ok"]
    assert any("key 'set-000000000' is in both" in p for p in report["problems"])


def test_manifest_count_differs_from_shard(tmp_path):
    root = make_set(tmp_path)
    info = json.loads((root / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][1] = 5
    info["splits"]["train"]["num_samples"] += 1  # the manifest agrees with itself, not with the shard
    (root / "_info.json").write_text(json.dumps(info))
    with pytest.raises(ShardError, match="set-000001.tar: holds 4 samples, the manifest says 5"):
        list(iter_samples(root))


def test_shard_missing_from_disk(tmp_path):
    root = make_set(tmp_path)
    (root / "set-000002.tar").unlink()
    with pytest.raises(ShardError, match="set-000002.tar not found"):
        list(iter_samples(root))


def test_undecodable_image_in_shard(tmp_path):
    shard = tmp_path / "bad.tar"
    rewrite_tar(shard, [member("k-000.cls", b"3"), member("k-000.png", b"\x89PNG not really")])
    with pytest.raises(ShardError, match=r"sample 'k-000' at byte offset 0: cannot decode its png"):
        read_shard(str(shard))


def test_label_not_an_integer(tmp_path):
    png = encode_sample("k", np.zeros((8, 8, 1), np.uint8), 0, {})["png"]
    shard = tmp_path / "bad.tar"
    rewrite_tar(shard, [member("k-000.cls", b"three"), member("k-000.png", png)])
    with pytest.raises(ShardError, match="label b'three' is not an integer"):
        read_shard(str(shard))


def test_skip_bad_shards_counts_in_log_and_report(tmp_path, capsys, caplog):
    """`eval accuracy --skip-bad-shards`: the damaged shard is skipped, logged and counted in the report."""
    root = make_set(tmp_path / "set")
    (root / "set-000001.tar").write_bytes((root / "set-000001.tar").read_bytes()[:3000])
    classifier = tmp_path / "clf"
    save_classifier(classifier, create_classifier("tinycnn", num_classes=10, in_chans=1),
                    {"model": "tinycnn", "num_classes": 10, "in_chans": 1})
    argv = ["eval", "accuracy", "--classifier", str(classifier), "--dataset", f"shards:{root}", "--split", "train"]
    assert "set-000001.tar: unreadable tar data at byte offset" in cli_error(capsys, *argv)
    assert main([*argv, "--skip-bad-shards"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 8 and report["shard_read"]["shards_skipped"] == 1
    assert report["shard_read"]["skipped"][0]["shard"].endswith("set-000001.tar")
    assert any("skipping bad shard" in r.getMessage() for r in caplog.records)


def test_shards_verify_reports_damage_with_exit_status_1(tmp_path, capsys):
    root = make_set(tmp_path)
    (root / "set-000002.tar").write_bytes((root / "set-000002.tar").read_bytes()[:-1024])
    assert main(["shards", "verify", str(root)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ok"] is False and "set-000002.tar" in captured.err


def test_shards_verify_on_a_missing_folder(capsys, tmp_path):
    assert "shard manifest not found" in cli_error(capsys, "shards", "verify", str(tmp_path / "none"))


# ------------------------------------------------------------------------------------------------
# model outputs


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_model_output_stops_the_job(capsys, tiny_model_dir, tmp_path, value, kind):
    model = poison_model(model_copy(tiny_model_dir, tmp_path), value)
    err = cli_error(capsys, *baseline_argv(model, tmp_path / "out"))
    assert f"shard baseline-000000.tar (samples 0..2): the model produced {kind} at sampling step 0 of 2" in err
    assert not list((tmp_path / "out").glob("*.tar"))  # nothing half-written


def test_non_finite_output_on_a_ray_actor_names_the_shard(ray_session, capsys, tiny_model_dir, tmp_path):
    model = poison_model(model_copy(tiny_model_dir, tmp_path), float("nan"))
    argv = baseline_argv(model, tmp_path / "out")
    argv[argv.index("--actors") + 1] = "1"
    err = cli_error(capsys, *argv)
    assert "shard baseline-00000" in err and "the model produced NaN at sampling step 0" in err


def test_a_job_made_without_a_newer_setting_names_it():
    # a _job.json written before a setting existed lacks it; the refusal must say which field differs
    old = {"kind": "baseline", "seed": 0, "sampling": {"steps": 5}}
    new = {"kind": "baseline", "seed": 0, "max_nn_ratio": None, "sampling": {"steps": 6}}
    assert differing_fields(old, new) == ["max_nn_ratio", "sampling.steps"]
