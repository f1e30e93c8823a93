"""Self-contained transformers + torch code that reproduces `mmemb encode` for an export.

The model card embeds the snippet for the exported backbone; `tests/test_interop_export.py`
executes the card's own copy and compares it with `mmemb encode`. Each snippet reads the prompt
settings from ``mmemb.json`` ("prompt"), so the template is data, not code. Items are embedded
one at a time (no padding), which mmemb's padded batches equal up to float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MODEL_PLACEHOLDER = "path/to/this/directory"

POOL_CODE: dict[str, str] = {
    "last_token": "hidden[-1]",
    "eos": "hidden[-1]",  # the appended EOS is the last token
    "mean": "hidden.float().mean(dim=0)",
    "cls": "hidden[0]",
    "max": "hidden.max(dim=0).values",
}

_PROMPT = '''

def build_prompt(side, text=None, has_image=False, instruction=None):
    """The exact prompt mmemb embeds (the strings are listed in mmemb.json "prompt")."""
    p = prompt_cfg
    if text and p.get("max_text_tokens"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > p["max_text_tokens"]:
            text = tokenizer.decode(ids[: p["max_text_tokens"]], skip_special_tokens=False)
    if not instruction:
        if side == "query":
            instruction = p.get("query_instruction")
        elif p.get("target_instruction"):
            instruction = p["target_instruction"]
        elif has_image and not text:
            instruction = p.get("target_image_instruction")
    content = p.get("image_placeholder", "") if has_image else ""
    if instruction:
        content += instruction + (p["instruction_separator"] if text else "")
    content += text or ""
    prompt = p["chat_template"].replace("{content}", content)
    if p.get("append_eos") and tokenizer.eos_token:
        prompt += tokenizer.eos_token
    return prompt
'''

_FINISH = '''
    vector = {pool}.float()
    return torch.nn.functional.normalize(vector, dim=-1) if {normalize} else vector
'''

_HEAD = '''import json

import torch
{imports}

MODEL = "{placeholder}"
prompt_cfg = json.load(open(f"{{MODEL}}/mmemb.json"))["prompt"]
'''

_HF_TEXT = '''tokenizer = AutoTokenizer.from_pretrained(MODEL)
model = AutoModel.from_pretrained(MODEL, dtype=torch.{dtype}).eval()
{prompt}

@torch.no_grad()
def embed(side, text=None, image=None, instruction=None):
    """One item -> its embedding, as `mmemb encode --side SIDE` computes it."""
    if image is not None:
        raise ValueError("this model reads text only")
    enc = tokenizer([build_prompt(side, text, False, instruction)], truncation=True,
                    max_length=prompt_cfg["max_length"], return_tensors="pt")
    hidden = model(**enc).last_hidden_state[0]
{finish}'''

_LLAVA_OV = '''# AutoTokenizer + AutoImageProcessor, not AutoProcessor: the latter builds
# LLaVA-OneVision's video processor, which needs torchvision. Nothing here does.
tokenizer = AutoTokenizer.from_pretrained(MODEL)
image_processor = AutoImageProcessor.from_pretrained(MODEL)
model = LlavaOnevisionForConditionalGeneration.from_pretrained(MODEL, dtype=torch.{dtype}).eval()
image_token_id = tokenizer.convert_tokens_to_ids(getattr(tokenizer, "image_token", None)
                                                 or "<image>")
{prompt}

@torch.no_grad()
def embed(side, text=None, image=None, instruction=None):
    """One item (text and/or a PIL image) -> its embedding, as `mmemb encode --side SIDE`."""
    ids = tokenizer(build_prompt(side, text, image is not None, instruction))["input_ids"]
    core = model.model  # the LLaVA-OneVision model without its LM head
    features = None
    if image is not None:
        image = image.convert("RGB")
        max_side = prompt_cfg.get("max_image_side")
        if max_side and max(image.size) > max_side:
            scale = max_side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)),
                                  max(1, round(image.height * scale))), Image.Resampling.BICUBIC)
        pix = image_processor([image], return_tensors="pt")
        out = core.get_image_features(
            pixel_values=pix["pixel_values"].to(model.dtype),
            image_sizes=torch.tensor([[image.height, image.width]]), return_dict=True)
        features = torch.cat(list(out.pooler_output))
        # One image token per feature vector, in place of the prompt's single image token.
        at = ids.index(image_token_id)
        ids = ids[:at] + [image_token_id] * len(features) + ids[at + 1:]
    input_ids = torch.tensor([ids])
    embeds = core.get_input_embeddings()(input_ids)
    if features is not None:
        embeds[input_ids == image_token_id] = features.to(embeds.dtype)
    hidden = core(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                  position_ids=torch.arange(len(ids))[None], use_cache=False).last_hidden_state[0]
{finish}'''

_BACKBONES: dict[str, tuple[str, str]] = {
    "hf_text": ("from transformers import AutoModel, AutoTokenizer", _HF_TEXT),
    "llava_onevision": (
        "from PIL import Image\nfrom transformers import (\n    AutoImageProcessor,\n"
        "    AutoTokenizer,\n    LlavaOnevisionForConditionalGeneration,\n)",
        _LLAVA_OV,
    ),
}

EXAMPLE = '''
# Examples
q = embed("query", text="a dog on a beach",
          instruction="Find an image that matches the given caption.")
'''


def supported(spec: Mapping[str, Any]) -> bool:
    return (spec["backbone"].get("name") in _BACKBONES
            and spec["pooler"].get("name") in POOL_CODE
            and not set(spec["pooler"]) - {"name"})


def transformers_snippet(spec: Mapping[str, Any]) -> str | None:
    """Python code defining ``embed(side, text=None, image=None, instruction=None)`` for the
    exported model with transformers + torch only; None for a backbone or pooler it does not
    cover (the card then shows the mmemb way only)."""
    if not supported(spec):
        return None
    imports, body = _BACKBONES[spec["backbone"]["name"]]
    finish = _FINISH.format(pool=POOL_CODE[spec["pooler"]["name"]],
                            normalize=bool(spec.get("normalize", True)))
    dtype = spec["backbone"].get("dtype", "float32")
    code = _HEAD.format(imports=imports, placeholder=MODEL_PLACEHOLDER) + body.format(
        dtype=dtype, prompt=_PROMPT, finish=finish.rstrip("\n"))
    return code.rstrip("\n") + "\n" + EXAMPLE
