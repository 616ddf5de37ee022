"""Config loading, overrides, validation and the shipped example configs."""
import glob
import os

import pytest

import ptpeft_fast
from ptpeft_fast.train import main
from ptpeft_fast.train.config import ConfigError, load_config


def test_set_overrides_and_print_config(capsys):
    assert main(["--print-config", "--config", _example("blip2-vqav2.yaml"), "--set", "stage1.lr=1e-3",
                 "--set", "stage2.lora.r=4"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.001" in out and "r: 4" in out and "alpha:" in out  # merged, not replaced


@pytest.mark.parametrize("override,message", [
    ("stage1.lrr=3", "unknown config key 'stage1.lrr'"),
    ("stage1.lr=abc", "stage1.lr must be float"),
    ("stage2.method=bitfit", "stage2.method='bitfit' is not allowed"),
    ("stage1.prefix.reparam=deep", "stage1.prefix.reparam"),
    ("stage2.lora.rank=3", "stage2.lora.rank"),
    ("data.format=csv", "data.format='csv'"),
    ("stage2.batch_size=6", "stage2.batch_size (6) must be divisible by stage2.grad_accum"),
])
def test_bad_values_name_the_key(override, message, capsys):
    extra = ["--set", "stage2.grad_accum=4"] if "batch_size" in override else []
    assert main(["--print-config", "--set", override, *extra]) == 2
    assert message in capsys.readouterr().err


def test_example_configs_validate():
    files = glob.glob(os.path.join(os.path.dirname(ptpeft_fast.__file__), "configs", "*.yaml"))
    names = {os.path.basename(f) for f in files}
    assert {"blip2-coco.yaml", "blip2-vqav2.yaml", "llava-vqav2.yaml", "demo.yaml"} <= names
    for f in files:
        load_config(f)


def test_missing_data_file_is_named(tmp_path, capsys):
    rc = main(["--config", _example("blip2-vqav2.yaml"), "--set", "model.name=tiny-blip2",
               "--set", "model.pretrained=false", "--set", f"data.train.questions={tmp_path}/q.json",
               "--set", f"output.dir={tmp_path}/out", "--set", "train.progress=false"])
    assert rc == 2
    assert f"data.train.questions: file not found: {tmp_path}/q.json" in capsys.readouterr().err


def test_fsdp_needs_several_processes(tmp_path):
    from ptpeft_fast.train.tasks import make_run
    with pytest.raises(ConfigError, match="fsdp shards the model across processes.*torchrun"):
        make_run(load_config(None, ["train.strategy=fsdp", "train.device=cpu"]), str(tmp_path))


def _example(name):
    return os.path.join(os.path.dirname(ptpeft_fast.__file__), "configs", name)
