"""`python tests/cpu_sharded.py <stage> ...` under `accelerate launch --config_file recipes/accelerate/{fsdp,zero3}.yaml`
on CPU processes: accelerate's real FSDP2 and DeepSpeed ZeRO-3 paths over gloo, for the tests.

accelerate turns FSDP and DeepSpeed on only after it finds an accelerator (`PartialState._prepare_backend`);
torch's FSDP2 (`fully_shard`) and DeepSpeed's ZeRO-3 themselves run on CPU tensors over gloo. This
launcher changes that one decision and nothing else: the stage, the trainer, accelerate's wrapping,
sharding and saving run as they do on GPUs.
"""

import os
import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_prepare_backend = PartialState._prepare_backend


def _gloo_as_accelerator(self, cpu=False, sagemaker_dp=False, backend=None):
    if not cpu and not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_GPU  # the branch under which accelerate honours FSDP and DeepSpeed
    return _prepare_backend(self, cpu, sagemaker_dp, backend)


if __name__ == "__main__":
    PartialState._prepare_backend = _gloo_as_accelerator
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    from alignment.cli import main

    code = main()
    if torch.distributed.is_initialized():  # gloo's threads abort the process at exit when the group is left open
        torch.distributed.destroy_process_group()
    sys.exit(code)
