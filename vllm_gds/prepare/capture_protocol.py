"""What `vllm-gds prepare` and its capture engine agree on (importable without vLLM)."""

CAPTURE_FORMAT = "vllm_gds_capture"


def record_name(rank: int) -> str:
    """The JSON record each rank writes beside its shard files once they are complete."""
    return f"capture-rank-{rank:05d}.json"
