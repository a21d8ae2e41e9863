"""`dapeng generate MODEL --prompt TEXT [--chat]`: text generation, streamed to stdout."""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLE = """example:
  dapeng generate smollm2-135m --prompt "The three primary colours are"
  dapeng generate smollm2-135m --chat --prompt "What is the capital of France?"
  dapeng generate smollm2-135m --chat                      # interactive chat; an empty line or Ctrl-D ends it
  dapeng generate smollm2-135m --prompt "Once" --temperature 0.8 --top-p 0.9 --seed 1 --max-new-tokens 64
  dapeng generate smollm2-135m --prompt "The recipe:" --num-beams 4 --no-repeat-ngram-size 3"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate text with a language model (streamed)",
        description="Continue a prompt, or chat through the model's chat template, with a KV cache; "
        "greedy by default, sampling with --temperature/--top-k/--top-p, beam search with --num-beams.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="hub name (smollm2-135m), Artifact folder or run directory")
    p.add_argument("--prompt", help="text to continue (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="use the chat template; interactive without --prompt")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-beams", type=int, default=1, help="above 1: beam search (the best text, printed at the end)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam scores are log-probabilities / length ** this (0: none; above 0 favours longer)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="no n-gram of this many tokens repeats (0: off)")
    p.add_argument("--stop", action="append", default=[], help="a string that ends the output (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="default: the precision the model was trained in, else auto")
    p.add_argument("--json", action="store_true", help="print {\"text\": ...} at the end instead of streaming")
    return p


def _stream(pipe: object, prompt: object, args: argparse.Namespace, chat: bool) -> str:
    pieces = pipe.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, stop=args.stop, stream=True, chat=chat,
                           system=args.system, seed=args.seed, num_beams=args.num_beams,
                           length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size)
    text = []
    for piece in pieces:
        text.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if not args.json:
        sys.stdout.write("\n")
    return "".join(text)


def run(args: argparse.Namespace) -> int:
    from dapeng.errors import DataError

    if args.prompt is None and not args.chat:
        raise DataError("nothing to continue", "pass --prompt TEXT, or --chat for an interactive chat")
    from dapeng.pipeline import load

    pipe = load(args.model, precision=args.precision)
    if args.prompt is not None:
        text = _stream(pipe, args.prompt, args, args.chat)
        if args.json:
            print(json.dumps({"text": text}))
        return 0
    history: list[dict[str, str]] = []
    while True:
        sys.stdout.write("> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        history.append({"role": "user", "content": line.strip()})
        history.append({"role": "assistant", "content": _stream(pipe, list(history), args, True)})
