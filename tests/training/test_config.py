"""The training config refuses what no training process could build, when it is loaded (in Dagster, before any
process starts), naming the bad value."""

import pytest
from pydantic import ValidationError

from training.config import load_train_config


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.preset=STDiT2-Q/9", "STDiT2-Q/9"),  # no such model preset
        ("model.overrides.hiddn_size=64", "hiddn_size"),  # a typo in an STDiT2Config field
        ("model.overrides.num_heads=5", "num_heads"),  # a size the model cannot have (192 / 5 heads)
        ("model.overrides.hidden_size=lots", "hidden_size"),  # a value of the wrong type
        ("data.bucket_preset=stage9", "stage9"),  # no such bucket preset, and not a YAML file
        ("data.mask_ratios={mask_no: 0.5}", "sum to 1"),  # frame-mask ratios that are not a distribution
        ("data.mask_ratios={mask_everything: 1.0}", "mask_everything"),  # an unknown mask type
    ],
)
def test_a_config_no_process_could_build_is_refused_on_load(override, named):
    with pytest.raises(ValidationError, match="(?s)" + named.replace("/", ".")):
        load_train_config("demo-cpu", [override])


def test_the_presets_and_their_documented_overrides_load():
    for preset in ("demo-cpu", "stage1", "stage2", "stage3"):
        load_train_config(preset)
    cfg = load_train_config("demo-cpu", ["model.overrides.depth=2", "data.bucket_preset=stage2",
                                         "data.bucket_preset=my_buckets.yaml"])
    assert cfg.model.overrides["depth"] == 2 and cfg.data.bucket_preset == "my_buckets.yaml"


def test_a_bucket_preset_may_be_any_file_path():
    for path in ("my_buckets.YAML", "configs/buckets", "/abs/buckets.yml"):
        assert load_train_config("demo-cpu", [f"data.bucket_preset={path}"]).data.bucket_preset == path


def test_checking_a_config_does_not_import_torch():
    """The Dagster step validates the config before launching: that must stay cheap (no torch import)."""
    import subprocess
    import sys

    code = ("import sys; from training.config import load_train_config; "
            "load_train_config('stage1', ['data.mask_ratios={mask_no: 1.0}', 'model.overrides.depth=2']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
