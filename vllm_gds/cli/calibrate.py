"""`vllm-gds calibrate MODEL`: the KV cache calibration file (arguments live beside the measurement)."""

from vllm_gds.kvcache.calibration import add_calibrate_arguments as add_arguments
from vllm_gds.kvcache.calibration import run_calibrate as run

HELP = "write the KV cache calibration file beside a model"

__all__ = ["HELP", "add_arguments", "run"]
