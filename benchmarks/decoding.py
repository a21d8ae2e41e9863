"""Beam-search speed: dapeng's decoding engine against Hugging Face `transformers` `generate`, in one run.

Two small, randomly initialised models, each against its Hugging Face twin:

* `lm`: dapeng's `LlamaLM` and `LlamaForCausalLM` holding **the same weights** (the
  name map of `tests/unit/test_models_hf_parity.py`), so both must find the same beams;
  `results.lm.same_output` is the fraction of rows whose best hypothesis is identical.
* `seq2seq`: dapeng's `Seq2SeqTransformer` and `MBartForConditionalGeneration` (pre-LN like
  dapeng's default) of **the same shapes** (width, layers, heads, feed-forward, vocabulary);
  their weights differ, so only the speed is compared.

Both sides decode a batch of `--batch` inputs with `--beams` beams for exactly `--new` tokens
(end-of-sequence is forbidden until then on both, `min_new_tokens`), so they do the same
amount of work. They are timed alternately, `--repeats` times, and the fastest run counts
(the least disturbed by other processes). `results.<model>.sentences_per_s` is the batch
divided by that time; `ratios.<model>_sentences_per_s` is dapeng ÷ transformers (above 1:
dapeng is faster).

    python benchmarks/decoding.py            # batch 32, beam 4, 32 new tokens
    python benchmarks/decoding.py --quick    # batch 4, 4 new tokens, one repeat

The last line of stdout is one JSON object (results, ratios, env).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from dapeng.models import MODELS

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 1000, 128, 2, 4, 2, 512
EOS, PAD = 2, 0


def log(msg: str) -> None:
    print(f"[decoding {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def llama_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """dapeng `lm` and transformers `LlamaForCausalLM` with the same random weights, fp32, eval mode."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=FFN,
                                   rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() > 1:
                p.mul_(20)  # spread the logits: std 0.02 makes every beam nearly tied
    ours = MODELS.create("lm", vocab_size=VOCAB, pad_id=PAD, hidden=HIDDEN, layers=LAYERS, heads=HEADS,
                         kv_heads=KV_HEADS, intermediate=FFN, max_positions=256).eval()
    sd = ref.state_dict()
    mapped = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for ours_name, hf_name in {
            "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
            "attn.o": "self_attn.o_proj", "ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj",
            "ffn.down": "mlp.down_proj", "norm1": "input_layernorm", "norm2": "post_attention_layernorm",
        }.items():
            mapped[f"layers.{i}.{ours_name}.weight"] = sd[p + hf_name + ".weight"]
    ours.load_state_dict(mapped)
    return ours, ref


def seq2seq_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """dapeng `seq2seq` and transformers `MBartForConditionalGeneration` of the same shapes, fp32, eval mode."""
    import transformers

    cfg = transformers.MBartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                                   encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                                   encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, max_position_embeddings=256,
                                   pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, decoder_start_token_id=1,
                                   forced_bos_token_id=None, forced_eos_token_id=None, scale_embedding=True,
                                   dropout=0.0, attention_dropout=0.0, activation_function="gelu")
    torch.manual_seed(0)
    ref = transformers.MBartForConditionalGeneration(cfg).eval()
    ours = MODELS.create("seq2seq", vocab_size=VOCAB, pad_id=PAD, bos_id=1, eos_id=EOS, hidden=HIDDEN,
                         layers=LAYERS, heads=HEADS, intermediate=FFN, max_positions=256, dropout=0.0).eval()
    return ours, ref


def best_time(fn: Callable[[], Any], now: Callable[[], float]) -> tuple[float, Any]:
    start = now()
    out = fn()
    return now() - start, out


def measure(name: str, ours: torch.nn.Module, ref: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    length = 16 if name == "lm" else 24
    ids = torch.randint(3, VOCAB, (args.batch, length), generator=gen)
    mask = torch.ones_like(ids)
    search = {"num_beams": args.beams, "max_new_tokens": args.new, "min_new_tokens": args.new,
              "length_penalty": 1.0, "early_stopping": False}
    if name == "lm":
        def dapeng_run() -> torch.Tensor:
            return ours.generate(ids, stop_ids=(EOS,), **search)[:, length:]
    else:
        def dapeng_run() -> torch.Tensor:
            return ours.generate(ids, mask.bool(), **search)[:, 1:]

    def hf_run() -> torch.Tensor:
        with torch.inference_mode():
            out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, eos_token_id=EOS,
                               pad_token_id=PAD, no_repeat_ngram_size=0, **search)
        return out[:, length:] if name == "lm" else out[:, 1:]

    now = time.perf_counter
    ours_times, ref_times = [], []
    for r in range(args.repeats):
        t, ours_out = best_time(dapeng_run, now)
        ours_times.append(t)
        t, ref_out = best_time(hf_run, now)
        ref_times.append(t)
        log(f"{name} repeat {r}: dapeng {ours_times[-1]:.2f}s, transformers {ref_times[-1]:.2f}s")
    result = {
        "dapeng_sentences_per_s": args.batch / min(ours_times),
        "transformers_sentences_per_s": args.batch / min(ref_times),
        "sentences_per_s": args.batch / min(ours_times),
        "new_tokens": [int(ours_out.shape[1]), int(ref_out.shape[1])],
    }
    if name == "lm":
        same = [torch.equal(a, b) for a, b in zip(ours_out, ref_out)]
        result["same_output"] = sum(same) / len(same)
    return result


def env_info(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "threads": torch.get_num_threads(), "precision": "fp32", "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu": cpu, "cores": os.cpu_count(),
        "batch": args.batch, "beams": args.beams, "new_tokens": args.new, "repeats": args.repeats,
        "model": {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS,
                  "intermediate": FFN},
        "load_average_at_end": os.getloadavg()[0],
        "note": "wall-clock best of repeats on a shared machine: other jobs ran at the same time",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--new", type=int, default=32, help="new tokens per hypothesis")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="batch 4, 4 new tokens, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.new, args.repeats = 4, 4, 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {"lm": measure("lm", *llama_pair(), args), "seq2seq": measure("seq2seq", *seq2seq_pair(), args)}
    ratios = {f"{name}_sentences_per_s": r["dapeng_sentences_per_s"] / r["transformers_sentences_per_s"]
              for name, r in results.items()}
    print(json.dumps({"results": results, "ratios": ratios, "env": env_info(args)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
