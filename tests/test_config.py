import dataclasses

import pytest

from phased_dmd_mp import toy
from phased_dmd_mp.config import ConfigError, load_config
from phased_dmd_mp.toy import ToyConfig


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("width: 32\nlr: 1e-3\natoms: [-1, 1]\n")
    config = load_config(ToyConfig, path, ["width=16", "max_weight=50"])
    assert config.width == 16 and config.lr == 1e-3 and config.max_weight == 50.0
    assert config.atoms == (-1.0, 1.0)  # list of ints -> tuple of floats


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["widht=3"], "unknown config key 'widht' \\(did you mean 'width'\\?\\)"),
        (["width=wide"], "width must be int"),
        (["width=2.5"], "width must be int"),
        (["subinterval_start=1.5"], "subinterval_start must be in \\(0, 1\\)"),
        (["atoms=[1]"], "at least two"),
        (["atoms=3"], "atoms must be a list"),
        (["nonsense"], "key=value"),
    ],
)
def test_user_mistakes_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ToyConfig, None, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ToyConfig, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(ToyConfig, bad)


def test_cli_reports_mistakes_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        toy.main(["--out", str(tmp_path), "--set", "depth=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "depth must be >= 2" in err and "Traceback" not in err


def test_a_bare_off_names_yaml_booleans():
    """`--set fp8=off` reads as false in YAML; the error says to quote it, and quoting works."""
    from phased_dmd_mp.distill.config import DistillConfig

    with pytest.raises(ConfigError, match="fp8 must be one of .*got False .*quote it"):
        load_config(DistillConfig, None, ["fp8=off"])
    assert load_config(DistillConfig, None, ["fp8='off'"]).fp8 == "off"


def test_field_docs_read_types_defaults_comments_and_sections():
    from phased_dmd_mp.config import field_docs
    from phased_dmd_mp.distill.config import DistillConfig

    docs = {doc.name: doc for doc in field_docs(DistillConfig)}
    assert list(docs) == [field.name for field in dataclasses.fields(DistillConfig)]
    ranges = docs["phase_t_ranges"]
    assert ranges.type == "[[float, float], ...]" and ranges.default == "[]"
    assert ranges.section == "algorithm"
    assert "0.875" in ranges.comment and "#" not in ranges.comment
    assert docs["moe_boundary"].type == "float | null" and docs["moe_boundary"].default == "null"
    assert docs["phase_gradient"].type == "sgts | all"
    assert docs["fp8"].default == "'off'"  # the YAML a user must write
    assert docs["teacher"].section == "what to distill"
    assert docs["max_consecutive_skips"].section == "cluster"
