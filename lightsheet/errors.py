"""Domain errors: each subclasses the built-in a caller would catch; messages say what, where."""

from __future__ import annotations

__all__ = [
    "AcquisitionError",
    "AnnotationError",
    "AtlasCoverageWarning",
    "AtlasError",
    "ClusterError",
    "ConfigError",
    "ImageError",
    "InputFilesError",
    "LightsheetError",
    "ModelError",
    "OutputDamagedError",
    "OutputExistsError",
    "OutputInUseError",
    "OutputNotWritableError",
    "OutputSpaceError",
    "PSFError",
    "PathNotAllowedError",
    "RegistrationError",
    "SampleError",
    "SegmentError",
    "SweepError",
    "TableError",
    "TileGridError",
    "UndersampledCellWarning",
    "ZeroLevelWarning",
]


class LightsheetError(Exception):
    """Base class of the project's errors."""


class InputFilesError(LightsheetError, FileNotFoundError):
    """No input files, or an input file that cannot be read."""


class TileGridError(LightsheetError, ValueError):
    """The tiles do not form a complete, unambiguous, uniform grid."""


class PSFError(LightsheetError, ValueError):
    """A point-spread function that cannot be used."""


class AtlasError(LightsheetError, ValueError):
    """An atlas folder or annotation that is missing parts or inconsistent."""


class ModelError(LightsheetError, ValueError):
    """A model checkpoint that cannot be loaded safely or does not match the architecture."""


class ConfigError(LightsheetError, ValueError):
    """A run configuration that is invalid."""


class ImageError(LightsheetError, ValueError):
    """An image array that a stage cannot process (wrong shape or dtype, NaN, negative)."""


class AtlasCoverageWarning(UserWarning):
    """Many cells fall outside every atlas region: usually a wrong orientation or voxel size."""


class UndersampledCellWarning(UserWarning):
    """The cells are under two pixels across or one plane deep: found, but fewer, coarsely."""


class ZeroLevelWarning(UserWarning):
    """Cells lie where the background is not above the level of no light (0, camera_offset)."""


class SampleError(LightsheetError, ValueError):
    """Bad arguments for the generated sample acquisition."""


class OutputExistsError(LightsheetError, FileExistsError):
    """An output folder holds files that would be overwritten."""


class SegmentError(LightsheetError, ValueError):
    """Segmentation input or parameters that cannot be used (shape, dtype, values)."""


class ClusterError(LightsheetError, RuntimeError):
    """A Dask cluster that cannot start, cannot take the work, or can no longer run it."""


class OutputSpaceError(LightsheetError, OSError):
    """The output's disk (or quota) is full: nothing was written at the named output."""


class AnnotationError(LightsheetError, ValueError):
    """An annotation file (points or masks) that cannot be read."""


class OutputDamagedError(LightsheetError, OSError):
    """A stored output lost or changed a file after it was written (named)."""


class OutputInUseError(LightsheetError, RuntimeError):
    """Another run holds the output folder's lock (its host, process and flow run named)."""


class PathNotAllowedError(LightsheetError, PermissionError):
    """A path outside the data roots a deployment allows, or an output inside an input."""


class RegistrationError(LightsheetError, RuntimeError):
    """Registration of the atlas to the sample failed (elastix crashed, timed out, bad input)."""


class SweepError(LightsheetError, ValueError):
    """Sweep parameters that cannot work (raised before any compute)."""


class AcquisitionError(LightsheetError, ValueError):
    """An acquisition folder that cannot be turned into a valid pipeline run."""


class TableError(LightsheetError, ValueError):
    """A table (cells, densities) without the columns or values a stage needs."""


class OutputNotWritableError(LightsheetError, PermissionError):
    """An output folder that cannot be created or written to."""
