"""The figures of the AlpacaEval length control and of export, printed by one command.

1. Length-controlled win rate: ours (`alignment.evaluate.length_control`) against the alpaca_eval
   package's own `get_length_controlled_winrate` (GLM `length_controlled_minimal`) on the same
   annotations: synthetic judges that like length, a wordier model, ties, several sizes and seeds.
   The package's download of AlpacaEval's instruction difficulty, which this GLM does not use, is
   replaced by a local stand-in (as in tests/test_alpaca_eval.py).
2. Export: a micro JetMoE with an expert LoRA adapter (random B), exported in float32 by
   `smoe-align export`, loaded by stock transformers in a fresh process: max |logits difference|
   against the stage output loaded the smoe-align way.

usage: python bench/eval_export_figures.py   (needs `pip install -e '.[alpaca_eval]'`)
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_alpaca_eval import package_metrics  # noqa: E402


class _Tmp:  # package_metrics takes pytest's tmp_path
    def __init__(self):
        self.path = Path(tempfile.mkdtemp())

    def __truediv__(self, name):
        return self.path / name


def length_control():
    from alignment.evaluate.length_control import length_controlled_win_rate

    print("| annotations | seed | raw win rate | LC (package) | LC (ours) | abs difference |\n|---|---|---|---|---|---|")
    worst = 0.0
    for n in (20, 100, 400, 805):
        for seed in range(3):
            rng = np.random.default_rng(seed)
            ref, mine = rng.integers(100, 2500, n), rng.integers(400, 3500, n)
            wins = rng.random(n) < 1 / (1 + np.exp(-(0.2 + 1.2 * np.tanh((mine - ref) / 800))))
            preference = np.where(wins, 2.0, 1.0)
            preference[rng.random(n) < 0.25] = 1.5
            annotations = [{"instruction": f"q{i}", "output_1": "r" * int(ref[i]), "output_2": "m" * int(mine[i]), "generator_1": "ref", "generator_2": "m",
                            "annotator": "judge", "preference": float(preference[i])} for i in range(n)]
            package = package_metrics(annotations, _Tmp())
            ours = length_controlled_win_rate(list(preference - 1), list(mine - ref))
            diff = abs(ours - package["length_controlled_winrate"] / 100)
            worst = max(worst, diff)
            print(f"| {n} | {seed} | {package['win_rate'] / 100:.4f} | {package['length_controlled_winrate'] / 100:.6f} | {ours:.6f} | {diff:.1e} |")
    print(f"\nlargest difference: {worst:.1e}\n")


STOCK = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def export():
    import torch
    from peft import LoraConfig, get_peft_model

    from alignment.cli import main
    from alignment.models.jetmoe import load_causal_lm
    from alignment.models.lora import expert_lora_config
    from alignment.models.tiny import TinyModelArgs, init_model

    root = Path(tempfile.mkdtemp())
    base = str(init_model(TinyModelArgs(output_dir=str(root / "base"), hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16, intermediate_size=64)))
    model = get_peft_model(load_causal_lm(base), expert_lora_config(LoraConfig(r=8, lora_alpha=16, target_modules=["kv_proj", "input_linear", "output_linear"], task_type="CAUSAL_LM")))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(root / "adapter")
    assert main(["export", "--model_name_or_path", str(root / "adapter"), "--output_dir", str(root / "export"), "--dtype", "float32"]) == 0
    ids = torch.randint(10, 250, (4, 64), generator=torch.Generator().manual_seed(1))
    torch.save(ids, root / "ids.pt")
    with torch.no_grad():
        ours = load_causal_lm(str(root / "adapter"), "float32").eval()(ids).logits
        plain = load_causal_lm(base, "float32").eval()(ids).logits
    subprocess.run([sys.executable, "-c", STOCK, str(root / "export"), str(root / "ids.pt"), str(root / "stock.pt")], check=True)
    stock = torch.load(root / "stock.pt")
    print(f"export, float32: max |stock exported - stage output| = {(stock - ours).abs().max().item():.1e}; the adapter moves logits by up to {(ours - plain).abs().max().item():.2f}")


if __name__ == "__main__":
    length_control()
    export()
