#!/bin/bash
# One GPU session, most wanted first, each part in its own process with its own time cap, so a part cut off
# or crashed loses only itself: install the carried wheels (.whl/, ignored by git, carried by the run), then
#   1. bench/memory_gpu.py: random-init OLMoE-1B-7B of the real size on disk, `smoe-align sft` QLoRA
#      through the stage's own loading, measured peak against estimate-memory (about 3 minutes)
#   2. bench/train_throughput.py, one mode per process: JetMoE-8B widths with 4 layers (built once under
#      --model-dir), Mixtral-8x7B widths with 2 layers; seq 2048, batch 4
# Results are JSON files under $RES, packed after each part into $OUT/gpu_results.tgz (the device returns at
# most 8 files). A CPU dry run of the same script: DRY=1 bash bench/gpu_run.sh (micro shapes, tiny OLMoE).
RES=${RES:-/tmp/gpu_results}; mkdir -p $RES; OUT=${OUT:-/tmp/gpu_out}; mkdir -p $OUT
pack() { tar czf $OUT/gpu_results.tgz -C $RES . ; }
if [ -z "$DRY" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD
  python3 -c "import datasets" 2>/dev/null || { echo "datasets 5.2 failed: alt"; rm -rf /tmp/site/datasets* /tmp/site/dill* /tmp/site/multiprocess*; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/alt/*.whl; }
  DEVICE=cuda JETMOE="--shape jetmoe-8b --layers 4" MIXTRAL="--shape mixtral --layers 2" SIZE="--seq 2048 --batch 4" MEMORY=
  PY=python3
else
  DEVICE=cpu JETMOE="--shape micro" MIXTRAL="--shape mixtral-micro" SIZE="--seq 64 --batch 2" MEMORY=--tiny
  PY=${PY:-.venv/bin/python}
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
$PY -c "import torch, transformers, trl, peft, datasets, bitsandbytes; print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__, datasets.__version__, bitsandbytes.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 | tail -1

echo "=== memory (OLMoE-1B-7B QLoRA dSFT)"
timeout ${MEMORY_CAP:-240} $PY bench/memory_gpu.py $MEMORY --workdir /tmp/memory_work > $RES/memory.log 2>&1; echo "rc $?"
grep -v "it/s\]\|s/it\]\|Loading weights\|Writing model\|examples/s\]\|^{'" $RES/memory.log | tail -30; pack

end=$(( $(date +%s) + ${BUDGET:-330} ))
for mode in ${MODES:-sft-lora sft-full dpo-lora mixtral-sft-lora sft-qlora dpo-qlora dpo-full packing}; do
  left=$(( end - $(date +%s) )); [ $left -lt 40 ] && { echo "skip $mode: time"; continue; }
  cap=$(( left < 120 ? left : 120 ))
  case $mode in  # [mixtral-]MODE[+compile]: Mixtral-8x7B widths; the project side under torch.compile
    mixtral-*) shape="$MIXTRAL --model-dir /tmp/bench-mixtral"; bench_mode=${mode#mixtral-} ;;
    *) shape="$JETMOE --model-dir /tmp/bench-jetmoe"; bench_mode=$mode ;;
  esac
  case $bench_mode in *+compile) bench_mode=${bench_mode%+compile}; shape="$shape --compile" ;; esac
  case $mode in sft-full|sft-lora) profile=--profile ;; *) profile= ;; esac  # the MFU-judged modes: where their step time goes
  echo "=== $mode ($left s left)"
  timeout $cap $PY bench/train_throughput.py --device $DEVICE $shape $SIZE --steps 2 --rounds 3 $profile \
      --modes $bench_mode --json $RES/gpu_$mode.json > $RES/$mode.log 2>&1; echo "rc $?"
  grep -E "^\[$bench_mode\]|; torch |Error|error:" $RES/$mode.log | tail -4      # the ratio line; the whole log is packed
  grep -A10 -m1 "Self CUDA %\|Self CPU %" $RES/$mode.log
  pack
done
