"""A run folder is data, never code: resume reads no pickle, verifies every file, falls back to the
previous state when the newest is damaged, stops with one line when none is usable, and logs
each training step once."""
import json
import os
import pickle
import shutil

import pytest
import torch

from ptpeft_fast.atomic_files import sha256_file
from ptpeft_fast.state_files import StateFormatError, decode, encode
from ptpeft_fast.train import main
from ptpeft_fast.train.checkpointing import MANIFEST, atomic_dir, folder_damage

from _train_helpers import events, write_yaml

# stage 1: 4 steps, stage 2: 4 steps; the run stops after 6 (stage 2, step 2) with a state saved
# after every step, so both state/ (step 2) and state.prev/ (step 1) exist
EXTRA = ("eval.zero_shot=false", "eval.after_each_stage=false", "output.save_every_steps=1")


class _Planted:
    """Unpickling this creates ``path``: proof that a pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupted")
    out = root / "run"
    conf = write_yaml(root / "c.yaml", *EXTRA, "train.interrupt_after_steps=6")
    assert main(["--config", conf, "--set", f"output.dir={out}"]) == 130
    assert (out / "state" / MANIFEST).is_file() and (out / "state.prev" / MANIFEST).is_file()
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _reseal(folder):
    """Rewrite the checksum list to match the files, as an attacker who edits a folder would."""
    sums = {p.name: sha256_file(str(p)) for p in folder.iterdir() if p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"sha256": sums}))


def test_state_is_safetensors_and_json(interrupted):
    names = sorted(p.name for p in (interrupted / "state").iterdir())
    assert names == [MANIFEST, "trainable.safetensors", "trainer.json", "trainer.safetensors"]
    meta = json.loads((interrupted / "state" / "trainer.json").read_text())
    assert meta["stage"] == "stage2" and meta["step"] == 2
    assert json.loads((interrupted / "state.prev" / "trainer.json").read_text())["step"] == 1


@pytest.mark.parametrize("name", ["trainer.pt", "trainer.json", "trainer.safetensors", "trainable.safetensors",
                                  MANIFEST])
def test_a_planted_pickle_never_runs(interrupted, tmp_path, capsys, name):
    out = _copy(interrupted, tmp_path)
    marker = tmp_path / "pwned"
    for folder in (out / "state", out / "state.prev"):
        if name == "trainer.pt":  # an old-format state: no trainer.json, a torch.save file
            (folder / "trainer.json").unlink()
            torch.save({"stage": "stage2", "step": 1, "x": _Planted(str(marker))}, folder / name)
        else:
            (folder / name).write_bytes(pickle.dumps(_Planted(str(marker))))
        if name != MANIFEST:
            _reseal(folder)
    capsys.readouterr()
    rc = main(["--resume", str(out)])
    err = capsys.readouterr().err
    assert not marker.exists(), "a pickle from the run folder was executed"
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "delete" in lines[0] and "restore" in lines[0], err
    assert str(out / "state") in lines[0]


def test_damaged_newest_state_falls_back_to_the_previous(interrupted, tmp_path, capsys):
    out = _copy(interrupted, tmp_path)
    f = out / "state" / "trainer.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte: still a readable file, but not the one that was written
    f.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["--resume", str(out)]) == 0
    log = capsys.readouterr().out
    assert f"{f} is damaged" in log and "continuing stage2 from step 1" in log, log
    assert "resumed: stage2 from step 1" in log
    steps = [e["step"] for e in events(str(out), "train") if e["stage"] == "stage2"]
    assert steps == [1, 2, 3, 4]  # every step once, the re-run step 2 included
    assert (out / "checkpoints" / "stage2" / MANIFEST).is_file()
    assert not (out / "state").exists() and not (out / "state.prev").exists()


def test_no_usable_state_stops_with_one_line(interrupted, tmp_path, capsys):
    out = _copy(interrupted, tmp_path)
    for folder in ("state", "state.prev"):
        f = out / folder / "trainer.json"
        f.write_text(f.read_text()[:-5])  # truncated
    capsys.readouterr()
    assert main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{out / 'state' / 'trainer.json'} is damaged" in err[0] and f"delete {out / 'state'}" in err[0]
    assert (out / "state" / "trainer.json").exists()  # nothing deleted on the user's behalf


def test_resume_keeps_one_record_per_step(interrupted, tmp_path, capsys):
    """A kill after a step was logged but before its state was saved: those records are dropped."""
    out = _copy(interrupted, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        for step in (3, 4):
            f.write(json.dumps({"event": "train", "stage": "stage2", "step": step, "loss": 9.0, "lr": 0.0}) + "\n")
    assert main(["--resume", str(out)]) == 0
    steps = [(e["stage"], e["step"]) for e in events(str(out), "train")]
    assert len(steps) == len(set(steps)) and steps[-4:] == [("stage2", s) for s in (1, 2, 3, 4)]
    assert all(e["loss"] != 9.0 for e in events(str(out), "train"))


def test_stage_checkpoints_are_verified(interrupted, tmp_path, capsys):
    out = _copy(interrupted, tmp_path / "copy")
    cfg = out / "checkpoints" / "stage1" / "ptpeft_config.json"
    text = cfg.read_text()
    assert '"num_tokens": 4' in text
    cfg.write_text(text.replace('"num_tokens": 4', '"num_tokens": 5'))
    capsys.readouterr()
    assert main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"stage1 is marked done but {cfg} is damaged" in err[0] and "restore it" in err[0], err
    ckpt = interrupted / "checkpoints" / "stage1"
    assert folder_damage(str(ckpt)) is None
    copy = tmp_path / "stage1"
    shutil.copytree(ckpt, copy)
    (copy / "ptpeft_config.json").write_text((copy / "ptpeft_config.json").read_text() + " ")
    assert folder_damage(str(copy)) == (f"{copy / 'ptpeft_config.json'} is damaged "
                                        f"(its checksum does not match {MANIFEST})")
    (copy / "ptpeft.safetensors").unlink()
    assert "is damaged" in folder_damage(str(copy)) or "is missing" in folder_damage(str(copy))


def test_a_failed_folder_write_leaves_nothing_behind(tmp_path):
    final = tmp_path / "state"

    def write(tmp):
        open(os.path.join(tmp, "a"), "w").write("x")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_dir(str(final), write)
    assert list(tmp_path.iterdir()) == []


def test_state_codec_round_trips_and_refuses_what_it_cannot_restore():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.randn(3, 2)
    opt.step()
    value = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "py": (3, (1, 2, 3), None),
             "nan": float("nan"), "keys": {1: "int key", "s": [1.5, True]}}
    tensors = {}
    data = json.loads(json.dumps(encode(value, tensors)))
    back = decode(data, tensors)
    assert back["py"] == (3, (1, 2, 3), None) and back["keys"] == {1: "int key", "s": [1.5, True]}
    assert torch.equal(back["rng"], value["rng"]) and back["nan"] != back["nan"]
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="cannot be saved without pickle"):
        encode({"f": lambda: 0}, {})
    with pytest.raises(StateFormatError):
        decode({"__tensor__": "missing"}, {})
    with pytest.raises(StateFormatError):
        decode({"__reduce__": "os.system"}, {})
