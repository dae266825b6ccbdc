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
        ({"camera_offset": -100}, "camera_offset"),
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
    assert config.psf == tmp_path / "psf.tif"


def test_each_channel_may_have_its_own_psf(tmp_path):
    # each wavelength blurs by its own PSF: a mapping of channel to file, relative to the YAML
    (tmp_path / "run.yaml").write_text(
        "input: tiles/*.tif\nvoxel_size_um: [2, 1, 1]\natlas: atlas\noutput: out\n"
        "psf: {0: psf_640.tif, 1: /abs/psf_488.tif}\n"
    )
    config = load_config(tmp_path / "run.yaml")
    assert config.psf == {0: tmp_path / "psf_640.tif", 1: Path("/abs/psf_488.tif")}
    assert config.psf_for(1) == Path("/abs/psf_488.tif") and config.psf_for(2) is None
    assert config.psf_paths() == [tmp_path / "psf_640.tif", Path("/abs/psf_488.tif")]
    assert config.deconvolution_psfs([0]) == {0: tmp_path / "psf_640.tif"}
    # one file serves every channel
    single = PipelineConfig.model_validate(REQUIRED)
    assert single.psf_for(5) == Path("/d/psf.tif") and single.psf_paths() == [Path("/d/psf.tif")]
    # the channels deconvolved need one each (all of them: checked at ingest, which counts)
    with pytest.raises(ValidationError, match=r"no PSF for channel\(s\) \[1\].*\[0, 1\]"):
        PipelineConfig.model_validate(
            {**REQUIRED, "psf": {0: "/d/a.tif"}, "deconvolve": {"channels": [0, 1]}}
        )
    PipelineConfig.model_validate(
        {**REQUIRED, "psf": {0: "/d/a.tif"}, "deconvolve": {"channels": [0]}}
    )
    for bad in ({}, {-1: "/d/a.tif"}):
        with pytest.raises(ValidationError, match="expected channel indices"):
            PipelineConfig.model_validate({**REQUIRED, "psf": bad})


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
        ({"camera_offset": float("inf")}, "camera_offset"),
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
    from tests.ingest.test_ingest import write_grid

    own, sibling = tmp_path / "brain[1] ü", tmp_path / "brain1 ü"
    write_grid(own / "tiles", grid=(1, 1, 1, 1, 2))
    write_grid(sibling / "tiles", grid=(1, 1, 1, 2, 2), seed=1)
    (own / "run.yaml").write_text(yaml.safe_dump({**REQUIRED, "input": "tiles/*.tif"}))
    config = load_config(own / "run.yaml")
    manifest = discover(config.input, config.pattern)
    assert {Path(t.path).parent for t in manifest.tiles} == {own / "tiles"}
    assert manifest.grid_shape == (1, 1, 1, 1, 2)


# --------------------------------------------------------------------------- resolved defaults

VOXEL_UM = (2.0, 1.0, 1.0)


def test_resolved_fills_every_derived_default_once():
    from lightsheet.config import SegmentConfig
    from lightsheet.config.derived import default_split_depth_um, default_volume_range_um3

    cfg = SegmentConfig(method="otsu", nucleus_diameter_um=12.0, subtract_background=True)
    r = cfg.resolved(VOXEL_UM)
    assert (r.min_volume_um3, r.max_volume_um3) == default_volume_range_um3(12.0)
    assert r.split_depth_um == default_split_depth_um(12.0, VOXEL_UM)
    assert r.background_radius_um == 12.0
    # the behaviour is the unresolved config's, and resolving is idempotent
    assert r.volume_range_um3() == cfg.volume_range_um3()
    assert r.resolved(VOXEL_UM) == r
    assert SegmentConfig.model_validate(r.model_dump(mode="json")) == r


def test_resolved_keeps_given_values_and_leaves_data_dependent_defaults():
    from lightsheet.config import SegmentConfig

    given = SegmentConfig(method="otsu", min_volume_um3=5.0, split_depth_um=0.7).resolved(VOXEL_UM)
    assert (given.min_volume_um3, given.split_depth_um) == (5.0, 0.7)
    # a checkpoint's record sets the model method's threshold and split depth
    model = SegmentConfig(method="model").resolved(VOXEL_UM)
    assert model.threshold is None and model.split_depth_um is None
    # the local method splits at significant dips, not at a distance-transform depth
    local = SegmentConfig().resolved(VOXEL_UM)
    assert local.split_depth_um is None and local.background_radius_um is None
    assert local.min_volume_um3 is not None


def test_pipeline_resolves_at_its_own_voxel_size():
    segment = {"method": "absolute", "threshold": 3}
    cfg = PipelineConfig.model_validate(
        {**REQUIRED, "voxel_size_um": [4.0, 0.5, 0.5], "segment": segment}
    )
    assert cfg.resolved().segment == cfg.segment.resolved((4.0, 0.5, 0.5))
    assert cfg.resolved().resolved() == cfg.resolved()


def test_cross_field_rule_messages_live_only_in_the_config():
    """No stage, task or flow repeats the config's cross-field rules (issue #24)."""
    root = Path(__file__).resolve().parents[1]
    rules = (
        "needs segment.threshold",
        "smallest volume kept",
        "give stitch.overlap or stitch.positions",
        "is the nuclei channel",
        "segment.background_channel is used by",
        "needs register.threads",
        "must not exceed max_jobs",
    )
    found = {
        rule: sorted(
            str(p.relative_to(root))
            for folder in ("lightsheet", "tasks", "flows")
            for p in (root / folder).rglob("*.py")
            if rule in p.read_text()
        )
        for rule in rules
    }
    for rule, files in found.items():
        assert files and all(f.startswith("lightsheet/config/") for f in files), (rule, files)


# --------------------------------------------------------------------------- rules in the schema

#: Cross-field combinations the config refuses, where Prefect's schema check says they fail
#: and the field its message names.
#: The server runs this same check (`validate`) on the deployment's parameter schema when a
#: flow run is created; tests/flows/test_deployments.py sends some of them to a real server.
BAD_COMBINATIONS = {
    "absolute without a threshold": ({"segment": {"method": "absolute"}}, "segment", "threshold"),
    "absolute with a null threshold": (
        {"segment": {"method": "absolute", "threshold": None}},
        "segment.threshold",
        "threshold",
    ),
    "background channel with otsu": (
        {"segment": {"method": "otsu", "background_channel": 1}},
        "segment.background_channel",
        "background_channel",
    ),
    "positions and overlap": (
        {"stitch": {"positions": "/d/positions.csv", "overlap": 0.1}},
        "stitch.overlap",
        "overlap",
    ),
    "penalty with threads": (
        {"register": {"bending_energy_weight": 0.1}},
        "register",
        "threads",
    ),
    "address without the profile": (
        {"cluster": {"address": "tcp://10.0.0.5:8786"}},
        "cluster.address",
        "address",
    ),
    "deconvolution without a psf": ({"psf": None}, "psf", "psf"),
    "address profile without an address": (
        {"cluster": {"profile": "address"}},
        "cluster",
        "address",
    ),
}
#: Rules JSON Schema cannot state (they compare two values): refused when the run starts.
NOT_IN_SCHEMA = {
    "min volume above max": {"segment": {"min_volume_um3": 500, "max_volume_um3": 100}},
    "background channel is the nuclei channel": {"segment": {"background_channel": 0}},
    "min_jobs above max_jobs": {"cluster": {"min_jobs": 5, "max_jobs": 2}},
}


@pytest.fixture(scope="module")
def pipeline_schema():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    return parameter_schema(pipeline.fn).model_dump_for_openapi()


def schema_check(schema, config: dict) -> str | None:
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    try:
        validate({"config": config}, schema, raise_on_error=True)
    except ValidationError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("case", list(BAD_COMBINATIONS))
def test_cross_field_rules_in_the_parameter_schema(pipeline_schema, case):
    change, path, field = BAD_COMBINATIONS[case]
    config = {**REQUIRED, **change}
    with pytest.raises(ValidationError):
        PipelineConfig.model_validate(config)
    message = schema_check(pipeline_schema, config)
    assert message is not None and f"'config.{path}'" in message and field in message, message


def test_good_combinations_pass_the_parameter_schema(pipeline_schema):
    for good in (
        {},
        {"segment": {"method": "absolute", "threshold": 3.0}},
        {"segment": {"method": "local", "background_channel": 1}},
        {"segment": {"background_channel": 1}},
        {"stitch": {"positions": "/d/positions.csv"}},
        {"stitch": {"positions": "/d/positions.csv", "overlap": [0, 0, 0]}},
        {"register": {"bending_energy_weight": 0.1, "threads": 1}},
        {"cluster": {"profile": "address", "address": "tcp://10.0.0.5:8786"}},
        {"cluster": {"profile": "local", "address": None}},
        {"psf": None, "deconvolve": {"enabled": False}},
        {"psf": None, "deconvolve": {"enabled": False}, "register": {"enabled": True}},
        {"psf": {0: "/d/a.tif", 1: "/d/b.tif"}},
    ):
        config = PipelineConfig.model_validate({**REQUIRED, **good}).model_dump(mode="json")
        assert schema_check(pipeline_schema, config) is None, good


@pytest.mark.parametrize("case", list(NOT_IN_SCHEMA))
def test_rules_the_schema_cannot_state_are_the_models(pipeline_schema, case):
    config = {**REQUIRED, **NOT_IN_SCHEMA[case]}
    assert schema_check(pipeline_schema, config) is None  # documented: refused at the start
    with pytest.raises(ValidationError):
        PipelineConfig.model_validate(config)
