from transformers import AutoModelForCausalLM, AutoTokenizer

CONVERSATION = [
    {"role": "user", "content": "sort 3091"},
    {"role": "assistant", "content": "Answer: 0139"},
]


def test_one_token_per_character_and_round_trip(micro_model):
    tok = AutoTokenizer.from_pretrained(micro_model)
    text = "reverse zebra, sort 91230"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok("héllo")["input_ids"]) == "héllo"  # bytes outside ASCII survive


def test_template_marks_assistant_turn_and_ends_with_eos(micro_model):
    tok = AutoTokenizer.from_pretrained(micro_model)
    out = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assistant = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(assistant) == "Answer: 0139" + tok.eos_token
    assert assistant[-1] == tok.eos_token_id
    prompt = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")


def test_model_loads_with_auto_classes(micro_model):
    model = AutoModelForCausalLM.from_pretrained(micro_model)
    cfg = model.config
    assert cfg.model_type == "jetmoe" and cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.eos_token_id == AutoTokenizer.from_pretrained(micro_model).eos_token_id
