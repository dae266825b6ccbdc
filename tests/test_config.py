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
