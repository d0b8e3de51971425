"""A tiny BERT with LoRA adapters built from a config (no hub) and token batches."""

from __future__ import annotations

import torch

from bdl.lora import lora_layers


def tiny_bert(seed: int = 0, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    base = BertForSequenceClassification(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0)
    model = get_peft_model(base, lora).to(dtype).eval()
    with torch.no_grad():  # a "trained" adapter: B is zero at initialisation
        for _, layer, adapter in lora_layers(model):
            layer.lora_B[adapter].weight.normal_(0, 0.3)
    return model


def batch(n=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, 8), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
