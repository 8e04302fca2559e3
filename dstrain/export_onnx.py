"""`dstrain export --format onnx`: the whole model (an adapter merged in) as OUTPUT/model.onnx for ONNX Runtime.

The graph takes `input_ids` and `attention_mask` (int64, [batch, sequence], both dimensions dynamic) and
returns `logits` ([batch, sequence, vocab], fp32), without a KV cache: it scores and ranks, and generates by
running the whole sequence again each token. torch.onnx's dynamo exporter writes the weights as external
data, OUTPUT/model.onnx.data next to the graph, so that models over protobuf's 2 GB limit export as well;
onnxruntime.InferenceSession(OUTPUT/model.onnx) finds it there. config.json and the tokenizer are written
too, so the directory has what it takes to tokenise a prompt and read the logits.

--quantize int8: onnxruntime's dynamic quantisation of the fp32 export (INT8 weights for every MatMul,
activations quantised per call), written as OUTPUT/model.onnx (and .data); the fp32 graph only passes
through a temporary directory.

After writing, the export checks itself, cheaply: one batch of two 8-token rows (the second padded on the
left) through onnxruntime and PyTorch. fp32 must agree within CHECK_ATOL on every real (unpadded) position,
else the export fails; for INT8 the largest logit difference and how often the top token agrees are printed.
"""

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional, Tuple

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
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8, use_external_data_format=True)


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
