"""Run configuration: the README's example is valid and shows the real defaults; bad keys fail."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from lightsheet.config import PipelineConfig, load_config

README = Path(__file__).resolve().parents[1] / "README.md"
REQUIRED = {
    "input": "/d/*.tif",
    "voxel_size_um": [2, 1, 1],
    "psf": "/d/psf.tif",
    "atlas": "/d/atlas",
    "output": "/d/out",
}


def readme_example() -> dict:
    text = README.read_text()
    start = text.index("```yaml", text.index("## Running on your own acquisition")) + len("```yaml")
    return yaml.safe_load(text[start : text.index("```", start)])


def test_readme_example_is_valid_and_shows_defaults():
    example = readme_example()
    config = PipelineConfig.model_validate(example)
    defaults = PipelineConfig.model_validate({**REQUIRED, "pattern": example["pattern"]})
    for section in ("stitch", "deconvolve", "featurize", "segment", "density", "cluster"):
        assert getattr(config, section) == getattr(defaults, section), section
        assert set(example[section]) == set(type(getattr(config, section)).model_fields), section


def test_default_pattern_matches_readme():
    assert readme_example()["pattern"] == PipelineConfig.model_fields["pattern"].default


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"colour": "red"}, "colour"),
        ({"segment": {"nucleus_diameter": 9}}, "nucleus_diameter"),
        ({"deconvolve": {"iterations": 0}}, "iterations"),
        ({"pattern": r"(?P<q>\d+)"}, "pattern"),
        ({"pattern": "(unclosed"}, "pattern"),
        ({"density": {"orientation": "aar"}}, "orientation"),
        ({"voxel_size_um": [2, 1]}, "voxel_size_um"),
        ({"voxel_size_um": [2, 0, 1]}, "voxel_size_um"),
    ],
)
def test_bad_values_name_the_field(change, field):
    with pytest.raises(ValidationError, match=field):
        PipelineConfig.model_validate({**REQUIRED, **change})


def test_relative_paths_are_relative_to_the_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump(
            {
                "input": "tiles/*.tif",
                "voxel_size_um": [2, 1, 1],
                "psf": "psf.tif",
                "atlas": "atlas",
                "output": "out",
            }
        )
    )
    config = load_config(tmp_path / "run.yaml")
    assert config.input == str(tmp_path / "tiles/*.tif")
    assert config.output == tmp_path / "out"


# --- bounded parsing and values a run cannot use (issue 25) ------------------------------

#: A 324-byte YAML whose aliases stand for 9**9 (387 million) strings.
ALIAS_BOMB = "".join(
    "{}: &{} [{}]\n".format(k, k, ", ".join([f"*{p}" if p else '"x"'] * 9))
    for p, k in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
)


@pytest.mark.timeout(60)
def test_yaml_alias_bomb_refused_quickly(tmp_path):
    from lightsheet.errors import ConfigError

    assert len(ALIAS_BOMB) < 600
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    with pytest.raises(ConfigError, match="aliases expand it to more than 100,000 values"):
        load_config(tmp_path / "bomb.yaml")
    # a few aliases (a shared section) are still fine
    (tmp_path / "ok.yaml").write_text(
        yaml.safe_dump(REQUIRED) + "defaults: &d {nucleus_diameter_um: 8}\n"
    )
    with pytest.raises(ValidationError, match="defaults"):  # unknown key, but parsed
        load_config(tmp_path / "ok.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input: [unclosed\nvoxel_size_um: 1\n", r"not valid YAML: .* at line 2, column"),
        ("a: &a [1, *a]\n", "refers to itself"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_unreadable_yaml_is_one_clear_error(tmp_path, text, message):
    from lightsheet.errors import ConfigError

    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "pattern", [r"(a+)+$", r"_ch(?P<c>(\d+)+)x", r"(x+x+)+y", r"^(([a-z])+.)+[A-Z]([a-z])+$"]
)
def test_pattern_with_catastrophic_backtracking_refused(pattern):
    with pytest.raises(ValidationError, match="exponential|longer than"):
        PipelineConfig.model_validate({**REQUIRED, "pattern": pattern})


@pytest.mark.timeout(60)
def test_pattern_matched_with_a_time_limit():
    from lightsheet.config import compile_pattern, search_name
    from lightsheet.errors import ConfigError

    rx = compile_pattern(r"(a|aa)+$")  # what a probe could miss, on a long name
    assert search_name(rx, "aaa").group(0) == "aaa"
    with pytest.raises(ConfigError, match="took longer than"):
        search_name(rx, "a" * 64 + "!")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"segment": {"method": "absolute", "threshold": float("nan")}}, "threshold"),
        ({"density": {"offset_um": [0, float("inf"), 0]}}, "offset_um"),
        ({"density": {"outside_warning_fraction": float("nan")}}, "outside_warning_fraction"),
        ({"voxel_size_um": [1e300, 1, 1]}, "voxel_size_um"),
    ],
)
def test_nan_inf_and_absurd_values_refused(change, field):
    with pytest.raises(ValidationError, match=field):
        PipelineConfig.model_validate({**REQUIRED, **change})


def test_yaml_nan_refused(tmp_path):
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump(REQUIRED) + "segment: {method: absolute, threshold: .nan}\n"
    )
    with pytest.raises(ValidationError, match="threshold"):
        load_config(tmp_path / "run.yaml")


def test_glob_characters_in_the_config_folder_are_literal(tmp_path):
    """A config in brain[1]/ reads its own tiles, never those of the sibling brain1/."""
    from lightsheet.ingest import discover
    from tests.test_ingest import write_grid

    own, sibling = tmp_path / "brain[1] ü", tmp_path / "brain1 ü"
    write_grid(own / "tiles", grid=(1, 1, 1, 1, 2))
    write_grid(sibling / "tiles", grid=(1, 1, 1, 2, 2), seed=1)
    (own / "run.yaml").write_text(yaml.safe_dump({**REQUIRED, "input": "tiles/*.tif"}))
    config = load_config(own / "run.yaml")
    manifest = discover(config.input, config.pattern)
    assert {Path(t.path).parent for t in manifest.tiles} == {own / "tiles"}
    assert manifest.grid_shape == (1, 1, 1, 1, 2)
