"""Random peft LoRA adapters for the tiny test LMs, and the base model with each merged in (the reference)."""
import torch

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_path: str, out_dir: str, target_modules, r: int, lora_alpha: float, seed: int,
                 use_rslora: bool = False, std: float = 0.3):
    """Saves a peft adapter with random A and B (peft starts B at zero: the update would be nothing) to
    out_dir; returns the base model with the adapter merged into its weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                                                  use_rslora=use_rslora, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out_dir)
    return peft_model.merge_and_unload().eval()


def greedy_ids(model, tok, prompts: list[str], max_new: int) -> list[list[int]]:
    outs = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        gen = model.generate(ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs
