"""Errors a user sees. Each names the file involved and the fix."""


class GdsError(ValueError):
    """Base class: a vllm-gds problem the user can fix."""


class ManifestError(GdsError):
    """The prepared directory's manifest is missing, malformed or unsafe."""


class LayoutMismatchError(GdsError):
    """The shards were prepared for another layout, dtype, quantization, vLLM or platform."""


class ShardReadError(GdsError):
    """A shard file could not be read completely."""


class ChecksumError(GdsError):
    """Bytes that landed differ from the bytes that were prepared."""
