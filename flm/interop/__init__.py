"""Hugging Face interop: flm models as ``LlamaForCausalLM`` checkpoints (:mod:`flm.interop.llama`),
flm tokenizers as ``tokenizer.json`` (:mod:`flm.interop.tokenizer`).

``save_hf(params, config, out_dir, tokenizer)`` writes a directory that
``transformers.LlamaForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load;
``load_hf(dir) -> (params, config)`` and ``load_hf_tokenizer(dir)`` read one back.
"""

from flm.interop.llama import (
    config_from_hf,
    from_hf_state_dict,
    hf_config,
    load_hf,
    rope_permutation,
    save_hf,
    to_hf_state_dict,
)
from flm.interop.tokenizer import load_hf_tokenizer, save_hf_tokenizer, tokenizer_json

__all__ = [
    "config_from_hf",
    "from_hf_state_dict",
    "hf_config",
    "load_hf",
    "load_hf_tokenizer",
    "rope_permutation",
    "save_hf",
    "save_hf_tokenizer",
    "to_hf_state_dict",
    "tokenizer_json",
]
