// llama.cpp's own view of a GGUF file, for tests/test_export_gguf.py: for each prompt, its tokenization and
// its greedy continuation, as token ids. Input (stdin, JSON): {"model": PATH, "prompts": [TEXT, ...],
// "maxTokens": N}. Output (stdout, JSON): {"addBos": BOOL, "chatTemplate": TEXT|null,
// "results": [{"tokens": [...], "continuation": [...]}, ...]}.
// The lowest-level API on purpose: model.tokenize (special tokens parsed, as Hugging Face tokenizers do) and a
// context sequence's evaluate at temperature 0, so that no chat wrapper adds a template, BOS or stop rule.
import {readFileSync} from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const request = JSON.parse(readFileSync(0, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: request.model});

async function greedy(tokens, maxTokens) {
    // One thread: llama.cpp's worker threads spin while they wait, and on a machine whose cores are shared
    // (CI, tests running side by side) several of them made a 16-token run take minutes instead of seconds.
    const context = await model.createContext({contextSize: tokens.length + maxTokens + 8, sequences: 1, threads: 1});
    const continuation = [];
    try {
        for await (const token of context.getSequence().evaluate(tokens, {temperature: 0, yieldEogToken: true})) {
            continuation.push(token);
            if (continuation.length >= maxTokens) break;
        }
    } finally {
        await context.dispose();
    }
    return continuation;
}

const results = [];
for (const prompt of request.prompts) {
    const tokens = Array.from(model.tokenize(prompt, true));
    results.push({tokens, continuation: await greedy(tokens, request.maxTokens)});
}
const chatTemplate = model.fileInfo.metadata?.tokenizer?.chat_template ?? null;
console.log(JSON.stringify({addBos: model.tokens.shouldPrependBosToken, chatTemplate, results}));
await model.dispose();
await llama.dispose();
