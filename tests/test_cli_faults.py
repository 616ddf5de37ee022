"""The training CLI's environment and input faults: exit status != 0, one line on stderr naming the
cause and the fix, nothing lost (the last complete state stays, no temporary folder is left)."""
import errno
import os
import sys

import pytest

import ptpeft_fast as pf
from ptpeft_fast.train import main

from _train_helpers import write_yaml

QUICK = ("eval.zero_shot=false", "eval.after_each_stage=false")


def _one_line(capsys, prefix):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


def test_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    assert main(["--config", write_yaml(tmp_path / "c.yaml", *QUICK), "--output", str(target)]) == 2
    assert "is a file; give a folder path with --output" in _one_line(capsys, "config error:")
    assert target.read_text() == "keep me"


def _unwritable() -> bool:
    try:
        os.makedirs("/sys/fs/ptpeft-out")
    except OSError:
        return True
    os.rmdir("/sys/fs/ptpeft-out")
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _unwritable(),
                    reason="needs a folder this process cannot write (Linux /sys/fs; root can write elsewhere)")
def test_output_that_cannot_be_written(tmp_path, capsys):
    assert main(["--config", write_yaml(tmp_path / "c.yaml", *QUICK), "--output", "/sys/fs/ptpeft-out"]) == 2
    assert "cannot write to output folder '/sys/fs/ptpeft-out'" in _one_line(capsys, "config error:")


def test_cuda_device_without_cuda(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--config", write_yaml(tmp_path / "c.yaml", *QUICK), "--output", str(tmp_path / "o"),
                 "--set", "train.device=cuda"]) == 2
    assert "train.device=cuda, but this torch sees no CUDA device" in _one_line(capsys, "config error:")


def test_empty_config_file(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert main(["--config", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert f"{empty} is empty" in _one_line(capsys, "config error:")
    assert not (tmp_path / "o").exists()


def test_resume_on_what_is_not_a_run(tmp_path, capsys):
    assert main(["--resume", str(tmp_path / "missing")]) == 2
    assert "no such folder" in _one_line(capsys, "config error:")
    demo = tmp_path / "demo"
    for method in ("lora", "prefix"):
        (demo / method).mkdir(parents=True)
        (demo / method / "config.yaml").write_text("{}")
    assert main(["--resume", str(demo)]) == 2
    line = _one_line(capsys, "config error:")
    assert "a folder of runs (lora, prefix" in line and f"--resume {demo / 'lora'}" in line
    import tiny
    ckpt = tmp_path / "ckpt"
    pf.save(pf.patch(tiny.llama(tmp_path), {"lora": {"r": 2}}), ckpt)
    assert main(["--resume", str(ckpt)]) == 2
    assert "a checkpoint written by ptpeft_fast.save" in _one_line(capsys, "config error:")


def test_disk_full_keeps_the_last_state_and_no_temporary(tmp_path, capsys, monkeypatch):
    import safetensors.torch as st

    out = tmp_path / "run"
    real = st.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, *a, **kw):
        if "state.tmp-" in str(filename) and str(filename).endswith("trainable.safetensors"):
            calls["n"] += 1
            if calls["n"] == 3:  # the third mid-stage save: two complete states exist before it
                open(filename, "wb").write(b"\0" * 10)  # a partial write, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(st, "save_file", save_file)
    rc = main(["--config", write_yaml(tmp_path / "c.yaml", *QUICK, "output.save_every_steps=1"),
               "--output", str(out)])
    assert rc == 1
    line = _one_line(capsys, "error: no space left on the device")
    assert "--resume" in line
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    assert (out / "state" / "COMPLETE").is_file() and (out / "state.prev" / "COMPLETE").is_file()
    monkeypatch.setattr(st, "save_file", real)
    assert main(["--resume", str(out)]) == 0
    assert "resumed: stage1 from step 2" in capsys.readouterr().out
