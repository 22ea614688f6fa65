"""export: a stage output as one standalone Hugging Face model directory; chat: talk to one in a terminal.

usage: smoe-align export --model_name_or_path runs/tiny/dpo --output_dir runs/tiny/export [--dtype bfloat16]
       smoe-align chat --model runs/tiny/export [--max_new_tokens 256 --temperature 0.7 --system "..."]

export takes what a stage wrote (a model directory, a LoRA or QLoRA adapter, an adapter chain), loads it
the way every stage does (`load_causal_lm`: adapters merged onto their full-precision base), and saves
the merged weights in the dtype asked for with the tokenizer and its chat template, so stock
`AutoModelForCausalLM.from_pretrained`, `transformers serve` and vLLM load it with no smoe-align code.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from alignment.errors import SmoeError
from alignment.manifest import write_manifest


@dataclass
class ExportArgs:
    model_name_or_path: str | None = None  # a stage output: model directory, adapter, adapter chain, or hub id
    output_dir: str | None = None
    dtype: str = "bfloat16"  # float32, bfloat16 or float16: the dtype of the saved weights

    def __post_init__(self):
        if not self.model_name_or_path or not self.output_dir:
            raise ValueError("export needs model_name_or_path (a stage output) and output_dir")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}; choose float32, bfloat16 or float16")


def run(args: ExportArgs):
    import torch

    from alignment.models.jetmoe import load_causal_lm, load_tokenizer
    from alignment.models.quant import dequantize_experts, is_quantized

    started = time.time()
    out = Path(args.output_dir)
    model = load_causal_lm(args.model_name_or_path, args.dtype)
    if is_quantized(model):  # a 4-bit model saved by `smoe-align quantize`: stock loaders read full precision
        dequantize_experts(model).to(getattr(torch, args.dtype))
    tokenizer = load_tokenizer(args.model_name_or_path)
    if not tokenizer.chat_template:
        raise SmoeError("the tokenizer has no chat template", args.model_name_or_path, "save one with the tokenizer (recipe key chat_template in sft) before exporting")
    model.config.use_cache = True  # training turns the cache off; a served model wants it
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_manifest(out, "export", started, source=args.model_name_or_path, dtype=args.dtype, parameters=sum(p.numel() for p in model.parameters()))
    print(f"[export] {args.model_name_or_path} -> {out} ({args.dtype})")
    return out


def chat(argv: list[str]) -> int:
    """A terminal conversation with a model or stage output; one user turn per line, /reset, /exit or EOF."""
    from teacher_data.teachers import HFTeacher, Sampling

    parser = argparse.ArgumentParser(prog="smoe-align chat", description=chat.__doc__)
    parser.add_argument("--model", required=True, help="a model directory, adapter or hub id")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    try:
        teacher = HFTeacher(args.model, batch_size=1, dtype=args.dtype)
    except (OSError, ValueError) as err:  # a directory without a model or tokenizer in it
        raise SmoeError(f"cannot load a model and tokenizer ({str(err).splitlines()[0]})", args.model, "point --model at a model directory (an exported one, say), an adapter or a hub id") from None
    sampling = Sampling(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    print(f"chatting with {args.model}; /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        (answer,) = teacher.complete([history], sampling)[0]
        history.append({"role": "assistant", "content": answer.text or ""})
        print(f"assistant> {answer.text}", flush=True)
