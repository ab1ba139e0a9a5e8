"""The error types (nightshift.errors): every one a NightshiftError, so callers and operators can tell
the project's errors from others."""

from __future__ import annotations

from nightshift.errors import CheckpointMismatch, ConfigError, DeviceOutOfMemory, NightshiftError


def test_errors_are_domain_errors():
    assert issubclass(DeviceOutOfMemory, NightshiftError) and issubclass(CheckpointMismatch, ConfigError)


def test_retryable_says_whether_the_same_task_could_succeed_again():
    from nightshift import errors

    retryable = {name for name in dir(errors) if isinstance(getattr(errors, name), type)
                 and issubclass(getattr(errors, name), NightshiftError) and getattr(errors, name).retryable}
    assert retryable == {"RegistryError", "BuildError", "DockerUnavailable", "ServingError",
                         "TrainingProcessFailed"}
    assert not errors.PreprocessingSkew.retryable  # a ServingError a retry cannot fix


def test_validation_failed_lists_every_failure_and_where_the_report_is():
    from nightshift.errors import ValidationFailed

    err = ValidationFailed([{"expectation": "min_rows", "summary": "12 < 100"},
                            {"expectation": "no_nulls", "column": "label", "summary": "3 nulls"}], "/r/validation.json")
    assert str(err).splitlines() == ["2 expectation(s) failed:", "  - min_rows: 12 < 100",
                                     "  - no_nulls [label]: 3 nulls", "full result: /r/validation.json"]
    assert err.failures[1]["column"] == "label" and err.report_path == "/r/validation.json"


def test_build_and_serving_errors_carry_the_tail_of_their_log():
    from nightshift.errors import BuildError, ServingError

    err = BuildError("build failed", logs="x" * 5000 + "the last line")
    assert err.logs.endswith("the last line") and str(err).endswith("the last line")
    assert len(str(err)) < 4100  # the tail, not the whole log
    assert str(BuildError("build failed")) == "build failed"
    assert ServingError("not ready", logs="boom").logs == "boom"
