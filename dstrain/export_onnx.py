"""`dstrain export --format onnx`: the whole model (an adapter merged in) as OUTPUT/model.onnx for ONNX Runtime.

The graph takes `input_ids` and `attention_mask` (int64, [batch, sequence], both dimensions dynamic) and
returns `logits` ([batch, sequence, vocab], fp32), without a KV cache: it scores and ranks, and generates by
running the whole sequence again each token. torch.onnx's dynamo exporter writes the weights as external
data, OUTPUT/model.onnx.data next to the graph, so that models over protobuf's 2 GB limit export as well;
onnxruntime.InferenceSession(OUTPUT/model.onnx) finds it there. config.json and the tokenizer are written
too, so the directory has what it takes to tokenise a prompt and read the logits.

--quantize int8: onnxruntime's dynamic quantisation of the fp32 export (INT8 weights, one scale per tensor,
activations quantised per call), written as OUTPUT/model.onnx (and .data); the fp32 graph only passes
through a temporary directory. It quantises the MatMuls of the model's Linear layers except those that
dstrain.int8.stays_fp32 names (the MLP's output projection, whose inputs have outlier activations, and
lm_head), the rule `generate --int8` follows; dstrain.int8's docstring has the measurements. A MatMul is
matched to its Linear by the module path the dynamo exporter records in the node's metadata. With tied
embeddings (SmolLM2) lm_head's MatMul is not quantised anyway, since its weight arrives through a Transpose
and dynamic quantisation only takes a MatMul whose weight is a constant (MatMulConstBOnly, on by default);
the embedding's Gather is quantised, though, so the shared matrix is stored INT8 and lm_head multiplies fp32
activations by its dequantised copy. Measured on SmolLM2-135M-Instruct (fp32 perplexity 60.1 on the first
800 tokens of benchmarks/int8.py's text): every MatMul 106.5 (size 0.26 of fp32), all but down_proj 62.4
(size 0.40); the embedding kept fp32 as well: 62.4 again (size 0.56), so it stays INT8. One scale per
output channel (per_channel=True) gains with every MatMul quantised (98.2) but not with down_proj excluded
(64.0), so the default, faster per-tensor scales stay.

After writing, the export checks itself, cheaply: one batch of two 8-token rows (the second padded on the
left) through onnxruntime and PyTorch. fp32 must agree within CHECK_ATOL on every real (unpadded) position,
else the export fails; for INT8 the largest logit difference and how often the top token agrees are printed.
"""

import ast
import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch

from dstrain.errors import ConfigError, DstrainError
from dstrain.loading import TrainedModel

MODEL_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
# fp32 ONNX Runtime against PyTorch: the same sums in other orders (measured 1e-7 at small shapes).
CHECK_ATOL = 1e-3
EXTRA_MISSING = "the ONNX export needs onnx, onnxscript and onnxruntime: pip install 'dstrain[onnx]'"


class OnnxExportError(DstrainError):
    """The exporter failed, or its graph does not compute what the model does."""

    kind = "onnx export error"


class LogitsOnly(torch.nn.Module):
    """The causal LM as a function of token ids and their mask to logits: the graph's one signature."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class OnnxFormat:
    """model.onnx (+ model.onnx.data), config.json and the tokenizer."""

    quantize_choices: Tuple[Optional[str], ...] = (None, "int8")
    holds_adapter = False

    def write(self, trained: TrainedModel, staging: Path, merged: bool, quantize: Optional[str]) -> None:
        require_onnx_extra()
        model = trained.whole_model().eval()
        if quantize == "int8":
            with tempfile.TemporaryDirectory(prefix="dstrain-onnx-fp32-") as fp32_dir:
                export_fp32(model, Path(fp32_dir) / MODEL_FILE)
                quantize_int8(Path(fp32_dir) / MODEL_FILE, staging / MODEL_FILE)
        else:
            export_fp32(model, staging / MODEL_FILE)
        model.config.save_pretrained(staging)
        trained.tokenizer.save_pretrained(staging)
        print(check_against_pytorch(model, staging / MODEL_FILE, exact=quantize is None))


def require_onnx_extra() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError(f"--format onnx: {EXTRA_MISSING}") from None


def export_fp32(model: torch.nn.Module, path: Path) -> None:
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {name: {0: batch, 1: sequence} for name in INPUT_NAMES}
    # A 2x8 example: with 1 in either dimension torch.export would specialise it to a constant.
    example = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    with quiet_exporter():
        try:
            torch.onnx.export(
                LogitsOnly(model).eval(), example, str(path), dynamo=True, external_data=True, verbose=False,
                input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], dynamic_shapes=dynamic,
            )
        except Exception as error:  # the exporter wraps every failure in its own types
            raise OnnxExportError(f"torch.onnx could not export {type(model).__name__}: {error}") from error


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_exporter():
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8, use_external_data_format=True,
                         nodes_to_exclude=fp32_matmul_names(fp32_path))


def fp32_matmul_names(path: Path) -> List[str]:
    """The MatMul nodes of the exported graph that compute a Linear layer dstrain.int8.stays_fp32 names."""
    import onnx

    from dstrain.int8 import stays_fp32

    graph = onnx.load(str(path), load_external_data=False).graph
    return [node.name for node in graph.node
            if node.op_type == "MatMul" and stays_fp32(exported_module_name(node) or "")]


def exported_module_name(node) -> Optional[str]:
    """The name (as the causal LM's named_modules gives it) of the module whose forward produced this node, from
    the scopes the dynamo exporter records: ['', 'model', 'model.model', ..., 'model.model.layers.0.mlp.down_proj',
    'linear_6'], the last one the node's own, the rest module paths from LogitsOnly (so each after the first
    starts with its attribute `model.`)."""
    scopes = next((entry.value for entry in node.metadata_props if entry.key == "pkg.torch.onnx.name_scopes"), None)
    if scopes is None:
        return None
    names = ast.literal_eval(scopes)
    return names[-2].removeprefix("model.") if len(names) >= 2 else None


def check_against_pytorch(model: torch.nn.Module, path: Path, exact: bool) -> str:
    """The module docstring's check; one line saying what it found."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    onnx_logits = onnx_runtime_logits(path, input_ids, attention_mask)
    with torch.no_grad():
        torch_logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    real = attention_mask.bool()  # padded positions attend to nothing: their logits mean nothing
    difference = (onnx_logits - torch_logits)[real].abs().max().item()
    if exact and difference > CHECK_ATOL:
        raise OnnxExportError(
            f"{path.name} gives logits up to {difference:.2e} away from PyTorch's (allowed: {CHECK_ATOL}): the "
            f"exported graph does not compute what the model does"
        )
    if exact:
        return f"checked {path.name} against PyTorch: logits within {difference:.1e}"
    agree = (onnx_logits.argmax(-1) == torch_logits.argmax(-1))[real].float().mean().item()
    return (f"checked {path.name} against fp32 PyTorch: logits within {difference:.2e}, the same top token at "
            f"{agree:.0%} of positions")


def onnx_runtime_logits(path: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    return torch.from_numpy(session.run([OUTPUT_NAME], feeds)[0])


class _DropRecords(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch.onnx and onnxruntime's notes about their own internals, which the user cannot act on: the
    exporter's step-by-step progress, optional ops it skips (torchvision's), dynamic axes it renames, and
    onnxruntime's advice to pre-process, which is for static quantisation of image models. Errors pass."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    advice = _DropRecords("Please consider to run pre-processing before quantization")
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        root.removeFilter(advice)
        exporter_log.setLevel(level)
