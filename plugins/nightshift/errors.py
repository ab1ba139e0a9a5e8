"""Domain exceptions. Each carries the evidence a user needs to act on it."""

from __future__ import annotations

from typing import Any


class NightshiftError(Exception):
    """Base class for every error Nightshift raises on purpose.

    ``retryable`` says whether running the same task again could succeed: bad
    data or config cannot; a daemon or container hiccup can.
    """

    retryable = False


class ConfigError(NightshiftError):
    """A setting, parameter or connection is missing or malformed."""


class DataError(NightshiftError):
    """The input data cannot be read or does not match what was configured."""


class ScoringError(DataError):
    """A model cannot be scored on the given data (missing file, other input shape, broken model,
    other or unnamed classes); raised by :mod:`nightshift.scoring`."""


class ValidationFailed(NightshiftError):
    """Data validation found failed expectations.

    :param failures: one dict per failed expectation (name, column, observed, details).
    :param report_path: where the full validation result was saved.
    """

    def __init__(self, failures: list[dict[str, Any]], report_path: str | None = None):
        self.failures = failures
        self.report_path = report_path
        lines = [f"{len(failures)} expectation(s) failed:"]
        for f in failures:
            col = f" [{f['column']}]" if f.get("column") else ""
            lines.append(f"  - {f['expectation']}{col}: {f.get('summary', '')}")
        if report_path:
            lines.append(f"full result: {report_path}")
        super().__init__("\n".join(lines))


class GPUUnavailable(NightshiftError):
    """``require_gpu=True`` but no CUDA device is visible."""


class TrainingDiverged(NightshiftError):
    """The training loss became NaN or infinite (usually a learning rate far too high)."""


class DeviceOutOfMemory(ConfigError):
    """Training ran out of device memory: the batch, the preloaded split or the model
    is too large for the device. Not retryable: the same settings need the same memory."""


class CheckpointMismatch(ConfigError):
    """A resume checkpoint (``last.pt``) was written by a run with other settings or
    other data; it is kept, and the message names the file to delete."""


class RegistryError(NightshiftError):
    """The model registry answered with an error other than "not found".

    Retryable: a registry that is down or refuses access may recover, and until
    it does no gate that needs it can be evaluated (fail closed).
    """

    retryable = True


class ParityError(NightshiftError):
    """The exported ONNX model disagrees with the PyTorch model beyond tolerance."""

    def __init__(self, message: str, report: dict[str, Any]):
        self.report = report
        super().__init__(message)


class BuildError(NightshiftError):
    """Building the inference image failed; ``logs`` holds the build output."""

    retryable = True

    def __init__(self, message: str, logs: str = ""):
        self.logs = logs
        super().__init__(f"{message}\n--- build log (tail) ---\n{logs[-4000:]}" if logs else message)


class DockerUnavailable(NightshiftError):
    """The Docker daemon a task was pointed at (an Airflow connection or ``DOCKER_HOST``)
    cannot be reached. Retryable: a daemon that is restarting may be back."""

    retryable = True


class ServingError(NightshiftError):
    """The inference container did not start, became unhealthy, or answered badly."""

    retryable = True

    def __init__(self, message: str, logs: str = ""):
        self.logs = logs
        super().__init__(f"{message}\n--- container log (tail) ---\n{logs[-4000:]}" if logs else message)


class PreprocessingSkew(ServingError):
    """The served model disagrees with the same ONNX file run in process: the serving
    path changes the pixels (decoding, resizing, dtype). A retry cannot fix it."""

    retryable = False


class TrainingProcessFailed(NightshiftError):
    """A training subprocess (``torchrun`` and its ranks) died; a retry resumes from ``last.pt``."""

    retryable = True
