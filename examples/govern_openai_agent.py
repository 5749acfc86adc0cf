"""A short agent loop governed by stackjax, against any OpenAI-compatible endpoint.

Without --base-url it starts the stackjax surrogate server on 127.0.0.1 (a SIMULATOR
of the Chat Completions API, not a language model) and runs against it:

    python examples/govern_openai_agent.py --sessions 4 --turns 3
    python examples/govern_openai_agent.py --base-url http://localhost:11434/v1 --model llama3.2 --api-key x

Each session asks arithmetic questions, lets the model call a calculator tool within
the tool budget the controller allows, grades the answers, and logs every call
(JSONL, `stackjax.call/1`) for `stackjax calibrate`.
"""

import argparse
import contextlib
import json
import os

import openai

from stackjax.deploy import GovernedClient, Governor, SurrogateServer, graders

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def calculator(name: str, arguments: str) -> str:
    try:
        args = json.loads(arguments or "{}")
        return str(int(args["a"]) + int(args["b"]))
    except (ValueError, KeyError, TypeError):
        return "error: expected integer arguments a and b"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible endpoint (default: a local surrogate)")
    parser.add_argument("--api-key", help="the API key (default: OPENAI_API_KEY)")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--budget", type=float, default=8000, help="tokens per session")
    parser.add_argument("--no-tools", action="store_true", help="for servers without tool support")
    parser.add_argument("--log", default="governed_calls.jsonl")
    args = parser.parse_args()

    key = args.api_key or os.environ.get("OPENAI_API_KEY") or ("sk-local" if not args.base_url else None)
    if key is None:
        parser.error("--api-key or OPENAI_API_KEY is required with --base-url")
    with contextlib.ExitStack() as stack:
        base_url = args.base_url
        if base_url is None:
            base_url = stack.enter_context(SurrogateServer()).base_url
            print(f"running against the stackjax surrogate (a simulator) at {base_url}")
        client = stack.enter_context(
            GovernedClient(
                openai.OpenAI(base_url=base_url, api_key=key), args.model, governor=Governor(), log=args.log
            )
        )
        total_tokens, correct, turns = 0, 0.0, 0
        for s in range(args.sessions):
            session = client.session(
                budget_tokens=args.budget,
                task_type="data_analysis",
                system="You are a careful assistant. Use the add tool when it helps.",
                tools=None if args.no_tools else [CALCULATOR],
                tool_handler=None if args.no_tools else calculator,
                grader=graders.Numeric(),
            )
            for t in range(args.turns):
                a, b = 137 * (s + 1) + t, 58 * (t + 2)
                result = session.ask(f"What is {a} + {b}?", reference=a + b)
                c, p, u = result.decision.action
                status = result.refused or (
                    f"score {result.quality.score:.0f}" if result.quality else "ungraded"
                )
                print(
                    f"session {s} turn {t}: c={c:.2f} p={p:.2f} u={u:.2f} calls={result.calls} "
                    f"tools={result.tool_calls_executed} tokens={result.tokens} "
                    f"budget left={result.budget_left:.0f} {status}"
                )
                total_tokens += result.tokens
                turns += 1
                correct += result.quality.score if result.quality else 0.0
        print(
            f"\n{turns} turns, {total_tokens} tokens ({total_tokens / max(turns, 1):.0f} per turn), "
            f"accuracy {correct / max(turns, 1):.2f}; every call logged to {args.log}"
        )


if __name__ == "__main__":
    main()
