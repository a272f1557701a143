"""Typed errors shared by every layer of rtp-mm.

Each user-facing error carries RTP-LLM's numeric ``error_code`` (see the behaviour reference, section 1.9) so the
server can map it to a wire body without string matching. ``ConfigError`` is raised at start-up and always names the
variable or field, the offending value and what is accepted.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """RTP-LLM's error codes, kept numerically identical for wire compatibility."""

    INPUT_FORMAT_ERROR = 507
    NO_PROMPT_ERROR = 509
    EMPTY_PROMPT_ERROR = 510
    LONG_PROMPT_ERROR = 511
    STOP_LIST_FORMAT_ERROR = 512
    CONCURRENCY_LIMIT_ERROR = 513
    UNKNOWN_ERROR = 514
    UNSUPPORTED_OPERATION = 515
    GENERATE_CONFIG_FORMAT_ERROR = 516
    UPDATE_ERROR = 601
    MALLOC_ERROR = 602
    TIMEOUT_ERROR = 603
    CANCELLED_ERROR = 499


class RtpMmError(Exception):
    """Base class of every error rtp-mm raises on purpose."""

    error_code: ErrorCode = ErrorCode.UNKNOWN_ERROR

    def __init__(self, message: str, error_code: ErrorCode | None = None):
        super().__init__(message)
        self.message = message
        if error_code is not None:
            self.error_code = error_code


class ConfigError(RtpMmError, ValueError):
    """Bad configuration (environment variable, ModelConfig field, CLI flag). Raised at start-up."""


class CheckpointError(RtpMmError):
    """A checkpoint file or folder that cannot be read or does not match the model."""


class NotImplementedYetError(RtpMmError, NotImplementedError):
    """A MODEL_TYPE (or feature) that is registered but not implemented yet: never silently run something else."""


class InvalidRequest(RtpMmError, ValueError):
    """A single request is malformed; it fails alone and the engine keeps serving."""

    error_code = ErrorCode.INPUT_FORMAT_ERROR


class GenerateConfigError(InvalidRequest):
    """A generate_config field has a bad type or value."""

    error_code = ErrorCode.GENERATE_CONFIG_FORMAT_ERROR


class EmptyPromptError(InvalidRequest):
    error_code = ErrorCode.EMPTY_PROMPT_ERROR


class PromptTooLongError(InvalidRequest):
    error_code = ErrorCode.LONG_PROMPT_ERROR


class UpdateError(InvalidRequest):
    """A LoRA update (POST /update, LLM.update_adapters) that cannot be applied: a bad adapter folder, more adapters
    than MAX_LORA_MODEL_SIZE, or a merged adapter. Nothing of the update is applied."""

    error_code = ErrorCode.UPDATE_ERROR


class CapacityExceeded(RtpMmError):
    """More requests in flight than CONCURRENCY_LIMIT allows (HTTP 409)."""

    error_code = ErrorCode.CONCURRENCY_LIMIT_ERROR


class RequestTimeout(RtpMmError):
    error_code = ErrorCode.TIMEOUT_ERROR


class RequestCancelled(RtpMmError):
    error_code = ErrorCode.CANCELLED_ERROR


class EngineDead(RtpMmError):
    """The engine loop stopped (shutdown or an internal fault); no new work is accepted."""
