"""Many-process training under accelerate (DDP, FSDP, DeepSpeed): refuse a launch that would not do
what was asked, and save one whole model from a sharded one.

`accelerate launch --config_file recipes/accelerate/fsdp.yaml` sets ACCELERATE_USE_FSDP; accelerate
honours it only where it finds an accelerator (CUDA, XPU, ...). On CPU processes the same launch runs
plain DDP (with `use_cpu: true`) or N unconnected copies of the run (without), both silently. The
checks here turn that into an error before any step is taken.
"""

import os

from alignment.errors import SmoeError



def requested() -> str | None:
    """The sharding the launcher asked for: 'FSDP', 'DEEPSPEED' or None."""
    for name in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true":
            return name
    return None


def check_before_loading(training_args, model_args):
    """QLoRA's experts are 4-bit blocks with quantisation states beside them, which FSDP cannot shard."""
    if model_args.load_in_4bit and (requested() == "FSDP" or training_args.fsdp):
        raise SmoeError(
            "load_in_4bit (QLoRA) cannot run under FSDP: the NF4 expert banks keep their quantisation states outside the parameters FSDP shards",
            "recipe key load_in_4bit with an FSDP launch",
            "train QLoRA on one GPU per run, or under DDP (recipes/accelerate/ddp.yaml); or use LoRA (load_in_4bit: false) under FSDP",
        )


def check_launch(trainer):
    """The trainer runs the sharding and the number of processes that the launcher asked for."""
    wanted, running = requested(), trainer.accelerator.distributed_type.name
    if wanted and running != wanted:
        raise SmoeError(
            f"the launch asked for {wanted} but accelerate runs {running}",
            "accelerate launch",
            f"{wanted} needs accelerators (accelerate turns it on only on GPUs and the like); on CPU processes use DDP: "
            "torchrun --nproc_per_node N -m alignment.cli ... --use_cpu true",
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != trainer.args.world_size:
        raise SmoeError(
            f"{launched} processes were launched but each trains alone (world size {trainer.args.world_size})",
            "accelerate launch",
            "on CPU processes add --use_cpu true (data parallel over gloo), or launch on GPUs",
        )


def prepare_final_save(trainer):
    """A sharded FSDP state dict saves no model at the end (transformers writes only full ones): gather it."""
    if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")


def describe(trainer) -> dict:
    """What ran, for the manifest: accelerate's distributed type, and the ZeRO stage under DeepSpeed."""
    state = trainer.accelerator.state
    found = {"distributed_type": state.distributed_type.name}
    if state.deepspeed_plugin is not None:
        found["zero_stage"] = state.deepspeed_plugin.zero_stage
    return found
