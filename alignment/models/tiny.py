"""A tiny JetMoE (or Mixtral-style) student and a character-level tokenizer, built locally for the embedded
default and the tests.

One token per byte (no merges) keeps digits and letters visible to the model: BPE merges hide them from
reversal, sorting and addition. The chat template marks assistant turns with `{% generation %}` so TRL's
assistant-only loss can find them, and ends every turn with EOS so generation stops after one reply.
The Mixtral-style student has dense attention and one bank of fused experts per layer (transformers 5's
`MixtralExperts`): the other MoE shape the toolkit trains.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, JetMoeConfig, JetMoeForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from alignment.manifest import write_manifest

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|unk|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class TinyModelArgs:
    """`smoe-align init-model`: a tiny MoE and its tokenizer. `family: jetmoe` has attention and MLP experts;
    `family: mixtral` has dense attention (kv_channels per head) and MLP experts."""

    output_dir: str = "runs/tiny/base"
    family: str = field(default="jetmoe", metadata={"choices": ("jetmoe", "mixtral")})
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    num_key_value_heads: int = 4
    kv_channels: int = 16
    intermediate_size: int = 128
    max_position_embeddings: int = 256
    aux_loss_coef: float = 0.01
    seed: int = 0

    def __post_init__(self):
        heads, rest = divmod(self.hidden_size, self.kv_channels)
        if self.family == "mixtral" and (rest or heads % self.num_key_value_heads):
            raise ValueError(f"family mixtral: hidden_size {self.hidden_size} must be kv_channels {self.kv_channels} (the head width) times a multiple of num_key_value_heads {self.num_key_value_heads}")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained with a vocabulary exactly as large as its alphabet: 256 bytes, no merges."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(alphabet), special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet
    )
    tok.train_from_iterator([""], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def build_model(args: TinyModelArgs, tokenizer) -> JetMoeForCausalLM | MixtralForCausalLM:
    torch.manual_seed(args.seed)
    if args.family == "mixtral":
        return MixtralForCausalLM(mixtral_config(args, tokenizer))
    config = JetMoeConfig(**shared_config(args, tokenizer), kv_channels=args.kv_channels, aux_loss_coef=args.aux_loss_coef)
    return JetMoeForCausalLM(config)


def shared_config(args: TinyModelArgs, tokenizer) -> dict:
    """What the tiny JetMoE and the tiny Mixtral share: width, depth, experts, embeddings, special tokens."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_key_value_heads=args.num_key_value_heads,
        intermediate_size=args.intermediate_size,
        num_local_experts=args.num_local_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        max_position_embeddings=args.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
        tie_word_embeddings=True,
    )


def mixtral_config(args: TinyModelArgs, tokenizer) -> MixtralConfig:
    """The same width, depth, experts and embeddings as the tiny JetMoE; attention dense, kv_channels per head."""
    return MixtralConfig(**shared_config(args, tokenizer), num_attention_heads=args.hidden_size // args.kv_channels, head_dim=args.kv_channels, router_aux_loss_coef=args.aux_loss_coef)


def init_model(args: TinyModelArgs) -> Path:
    out = Path(args.output_dir)
    tokenizer = build_tokenizer()
    model = build_model(args, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run(args: TinyModelArgs):
    """The init-model stage."""
    started = time.time()
    out = init_model(args)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters())
    write_manifest(out, "init-model", started, parameters=n_params)
