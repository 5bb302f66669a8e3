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
