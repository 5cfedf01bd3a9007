"""One device path for every command: the trainer, the sampling command line, the web page and the benchmarks
all default to `auto` and resolve it through `gm.device` (Ascend where its toolkit is, fp16 there, fp32 on CPU)."""
import os
import sys

import pytest

import gm.device
from gm.device import resolve_device


@pytest.fixture(params=["CPU", "Ascend"])
def machine(request, monkeypatch):
    """A machine without or with the Ascend toolkit (as `default_device_target` detects it)."""
    for name in ("ASCEND_HOME_PATH", "ASCEND_OPP_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os.path, "isdir", lambda path, isdir=os.path.isdir: path != "/usr/local/Ascend" and isdir(path))
    if request.param == "Ascend":
        monkeypatch.setenv("ASCEND_HOME_PATH", "/opt/ascend-toolkit")
    return request.param


def test_auto_resolves_to_the_machine(machine):
    assert resolve_device() == ((machine, "fp16") if machine == "Ascend" else ("CPU", "fp32"))
    assert resolve_device("CPU", "auto") == ("CPU", "fp32")
    assert resolve_device("auto", "fp32") == (machine, "fp32")
    with pytest.raises(ValueError, match="bf16 needs Ascend"):
        resolve_device("CPU", "bf16")


def test_every_command_defaults_to_auto_and_resolves_through_gm_device(root, machine, tmp_path):
    sys.path.insert(0, os.path.join(root, "demo"))
    import sampling_without_streamlit
    import train_textual_inversion
    from demo.sampling import page_defaults

    expected = (machine, "fp16" if machine == "Ascend" else "fp32")
    # the trainer: its argument check resolves the device (before anything is built)
    args = train_textual_inversion.parse_args(["--data_path", os.path.join(root, "datasets", "synthetic_toy"),
                                               "--placeholder_token", "<t>", "--save_path", str(tmp_path / "run"),
                                               "--config", os.path.join(root, "configs/training/sd_xl_tiny_textual_inversion.yaml")])
    assert (args.device_target, args.precision) == ("auto", "auto")
    config = train_textual_inversion.load_config(args.config)
    train_textual_inversion.resolve_defaults(args, config)
    train_textual_inversion.check_args(args)
    assert (args.device_target, args.precision) == expected
    # the sampling command line
    parser = sampling_without_streamlit.get_parser()
    args = parser.parse_args(["--prompt", "a photo"])
    assert (args.device_target, args.precision) == ("auto", "auto")
    sampling_without_streamlit.check_args(parser, args)
    assert (args.device_target, args.precision) == expected
    # the web page (its start_device hands these to resolve_device)
    page = page_defaults([])
    assert (page.device_target, page.precision) == ("auto", "auto")
    assert resolve_device(page.device_target, page.precision) == expected


def test_benchmarks_choose_the_device_through_gm_device(monkeypatch):
    from benchmarks import common

    asked = []
    monkeypatch.setattr(gm.device, "set_device", lambda target="auto", ms_mode=0: asked.append(target) or "Ascend")
    common.set_mindspore_threads(2)
    assert asked == ["auto"]


def test_flash_attention_only_where_its_dtype_and_head_size_allow():
    import mindspore as ms

    from gm.modules.layers import flash_attention_allowed

    assert flash_attention_allowed(ms.float16, 10, 64) and flash_attention_allowed(ms.bfloat16, 20, 64)
    assert not flash_attention_allowed(ms.float32, 10, 64)  # fp32 on Ascend: the plain path
    assert not flash_attention_allowed(ms.float16, 4, 24) and not flash_attention_allowed(ms.float16, 1, 1024)
