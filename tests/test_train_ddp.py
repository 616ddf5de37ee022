"""torchrun --nproc_per_node 2 (gloo, CPU) takes the same steps as one process with the
same global batch."""
import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from ptpeft_fast.train.tasks import make_run

from _train_helpers import cfg, checkpoint_tensors, events, write_yaml

EXTRA = ("stage1.max_steps=3", "stage2.max_steps=3", "stage1.lr=3e-2", "stage2.lr=3e-2",
         "eval.zero_shot=false", "eval.after_each_stage=false", "eval.spectrum=false")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(conf, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "ptpeft_fast.train", "--config", conf,
           "--set", f"output.dir={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)


def _assert_same_checkpoints(one, two):
    for stage in ("stage1", "stage2"):
        a, b = checkpoint_tensors(one, stage), checkpoint_tensors(two, stage)
        assert a.keys() == b.keys()
        for k in a:
            # not bit-equal: the all-reduce sums in another order, and Adam's 1/sqrt(v) scales
            # that float noise up for near-zero gradients; both stay far below one step (lr)
            rel = float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12))
            assert rel < 1e-3 and float((a[k] - b[k]).abs().max()) < 1e-3, (stage, k, rel)


def test_torchrun_two_processes_match_one(tmp_path):
    one = str(tmp_path / "one")
    make_run(cfg(*EXTRA), one).execute()

    two = str(tmp_path / "two")
    r = _torchrun(write_yaml(tmp_path / "c.yaml", *EXTRA), two)
    # a rank that ended in std::terminate at exit (SIGABRT) after its work: issue 30
    assert r.returncode == 0 and "terminate called" not in r.stderr, r.stderr[-3000:]
    _assert_same_checkpoints(one, two)
    la = [e["loss"] for e in events(one, "train")]
    lb = [e["loss"] for e in events(two, "train")]
    assert la == pytest.approx(lb, rel=1e-5)
    # predictions were gathered from both ranks: every question was answered once
    ea, eb = events(one, "eval")[-1], events(two, "eval")[-1]
    assert ea["n"] == eb["n"] == 16


FSDP = ("stage1.max_steps=3", "stage2.max_steps=3", "stage1.lr=3e-2", "stage2.lr=3e-2", "eval.max_samples=5",
        "eval.after_each_stage=false", "train.strategy=fsdp")


def test_fsdp_two_processes_match_one_and_resume(tmp_path):
    """FSDP2 on CPU (gloo): zero-shot under pf.disabled equals the unpatched model, the sharded
    steps equal one process's, an odd eval set is answered once per record on both ranks
    (synced generate), the spectrum forwards run on every rank, and a mid-stage interrupt
    resumes from the gathered checkpoint to the same parameters."""
    one = str(tmp_path / "one")
    make_run(cfg(*FSDP[:-1]), one).execute()

    conf = write_yaml(tmp_path / "c.yaml", *FSDP)
    two = str(tmp_path / "two")
    r = _torchrun(conf, two, "--set", "train.interrupt_after_steps=4")  # stops in stage 2, after its step 1
    assert "exitcode  : 130" in r.stderr, r.stderr[-3000:]  # both ranks stop resumably; torchrun exits 1
    assert "interrupted in stage2 at step 1/3" in r.stdout + r.stderr
    r = _torchrun(conf, two, "--resume", two)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sharded over 2 processes" in r.stdout
    _assert_same_checkpoints(one, two)
    ea, eb = events(one, "eval"), events(two, "eval")
    assert [e["phase"] for e in ea] == [e["phase"] for e in eb] == ["zero_shot", "eval_stage2"]
    assert eb[-1]["n"] == ea[-1]["n"] == 5
    for x, y in zip(ea, eb, strict=True):
        assert x["metrics"] == pytest.approx(y["metrics"], abs=1e-6)
        assert x["spectrum"]["effective_rank"] == pytest.approx(y["spectrum"]["effective_rank"], rel=1e-4)


def test_fsdp_full_finetune_gathers_the_whole_model(tmp_path):
    extra = ("stage1.enabled=false", "stage2.method=full", "stage2.lr=1e-3", "eval.zero_shot=false")
    one = str(tmp_path / "one")
    make_run(cfg(*FSDP[:-1], *extra), one).execute()
    two = str(tmp_path / "two")
    r = _torchrun(write_yaml(tmp_path / "c.yaml", *FSDP, *extra), two)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (load_file(os.path.join(d, "checkpoints", "stage2", "full_model.safetensors")) for d in (one, two))
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        assert a[k].shape == b[k].shape, k  # whole tensors, not one rank's shard
        assert float((a[k] - b[k]).abs().max()) < 1e-3, k


# Rank 1 dies in its first optimizer step the way an OOM-killed process does (no exception, no
# goodbye); rank 0 goes on into the next step's gradient all-reduce. Both run the console entry
# point (what `python -m ptpeft_fast.train` and `ptpeft-train` run): a worker leaves through
# os._exit, since an interpreter shutdown after a broken gloo group can still abort in
# std::terminate (seen on torch 2.11 when this script called sys.exit(main(...)) instead).
DYING_RANK = r'''
import os, sys
import torch
from ptpeft_fast.train.cli import console
if os.environ["RANK"] == "1":
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    register_optimizer_step_pre_hook(lambda *a: os._exit(9))
console()
'''


def test_a_rank_that_dies_leaves_the_others_one_clear_line(tmp_path):
    """Two processes started without torchrun (which would SIGTERM the survivor at once): the
    survivor stops within seconds with one line naming the cause and the fix, not a traceback."""
    conf = write_yaml(tmp_path / "c.yaml", *EXTRA)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, "-c", DYING_RANK, "--config", conf, "--set", f"output.dir={tmp_path / 'out'}"]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    (_, err0), (_, _) = (p.communicate(timeout=240) for p in procs)
    assert procs[1].returncode == 9
    assert procs[0].returncode == 1, err0[-3000:]
    lines = [ln for ln in err0.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "another process of this torchrun job stopped first" in lines[0], err0[-3000:]
    assert "--resume" in lines[0] and "Traceback" not in err0 and "terminate called" not in err0
