"""The `stackjax` command line."""

import argparse
import platform
import sys

from ._version import __version__


def _info(args: argparse.Namespace) -> int:
    import jax

    print(f"stackjax {__version__}")
    print(f"python   {platform.python_version()}")
    print(f"jax      {jax.__version__} (backend: {jax.default_backend()})")
    print(f"devices  {', '.join(str(d) for d in jax.devices())}")
    return 0


REPORT_KEYS = (
    "token_r2_cell",
    "quality_mae_cell",
    "verbosity_effect_mae",
    "token_r2_call",
    "quality_r2_call",
    "n_calls",
    "n_skipped",
)


def _write_json_atomically(path: str, payload: dict) -> None:
    import json

    from ._io import atomic_write

    atomic_write(path, lambda handle: handle.write(json.dumps(payload, indent=2) + "\n"), binary=False)


def _task_values(option: str, items: list[str]) -> dict[str, float]:
    """Parse repeated `TASK=NUMBER` options."""
    out = {}
    for item in items:
        task, sep, value = item.partition("=")
        try:
            out[task.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"{option}: expected TASK=NUMBER, got {item!r}")
    return out


def _calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from .governance import calibrate, data, response

    anchor = None if args.anchor_level == "none" else args.anchor_level
    try:
        prior = response.ResponseModel.prior(_task_values("--verbosity-prior", args.verbosity_prior))
        records = data.load(args.data)
        evaluation = data.load(args.eval) if args.eval else None
    except ValueError as err:
        print(f"stackjax calibrate: {err}", file=sys.stderr)
        return 2
    print(f"fitting on {len(records)} calls ({records.n_skipped} rows skipped: {records.skipped or 'none'})")
    model = calibrate.fit_response_model(records, steps=args.steps, prior=prior)
    if args.out:
        response.save(model, args.out)
        print(f"saved the fitted response model to {args.out}")

    if evaluation is not None:
        protocol = f"held-out files {args.eval}"
        report, _ = calibrate.evaluate_held_out(model, evaluation, anchor_level=anchor)
        report["n_skipped"] = evaluation.n_skipped
    else:
        protocol = "leave-one-exam-out"
        report, _ = calibrate.leave_one_group_out(
            records, steps=args.steps, anchor_level=anchor, prior=prior, progress=True
        )
    anchor_note = f", anchored on each task's {anchor} calls" if anchor else ", no anchor"
    print(f"\n{protocol}{anchor_note}:")
    for key in REPORT_KEYS:
        value = report[key]
        print(f"  {key:22s} {value:.4f}" if isinstance(value, float) else f"  {key:22s} {value}")
    by_group = report.pop("by_group")
    print(f"\n  {'by task':28s} {'cells':>5s} {'token R2':>9s} {'quality MAE':>12s} {'effect MAE':>11s}")
    for group, figures in by_group.items():
        print(
            f"  {group:28s} {figures['n_cells']:5d} {figures['token_r2_cell']:9.3f} "
            f"{figures['quality_mae_cell']:12.3f} {figures['verbosity_effect_mae']:11.3f}"
        )
    if args.json:
        number = lambda v: float(v) if isinstance(v, (float, np.floating)) else int(v)  # noqa: E731
        payload = {k: number(v) for k, v in report.items()}
        payload["by_group"] = {g: {k: number(v) for k, v in f.items()} for g, f in by_group.items()}
        payload["protocol"] = protocol
        payload["anchor_level"] = anchor
        _write_json_atomically(args.json, payload)
        print(f"wrote {args.json}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .governance import demo

    print(
        "stackjax demo: a simulation on the response model calibrated on real API logs "
        "(no API is called).\n"
        f"Training a task-aware leader policy: {args.steps} steps x {args.train_sessions} sessions x "
        f"{args.turns} turns, then {args.eval_sessions} fresh sessions per controller.\n"
    )
    result = demo.run(
        train_sessions=args.train_sessions,
        steps=args.steps,
        eval_sessions=args.eval_sessions,
        turns=args.turns,
        seed=args.seed,
    )
    print(f"\ntrained in {result.train_seconds:.1f} s\n")
    print(demo.format_table(result))
    if args.plot:
        demo.plot(result, args.plot)
        print(f"\nsaved the plot to {args.plot}")
    return 0


def _surrogate_config(args: argparse.Namespace):
    from .deploy.surrogate import SurrogateConfig
    from .governance import response

    model = response.load(args.response_model) if args.response_model else None
    return SurrogateConfig(
        model=model,
        seed=args.seed,
        fault_429=args.fault_429,
        fault_500=args.fault_500,
        fault_slow=args.fault_slow,
        fault_malformed=args.fault_malformed,
        slow_seconds=args.slow_seconds,
        tool_rounds=args.tool_rounds,
        log=args.log,
    )


def _serve(args: argparse.Namespace) -> int:
    from .deploy import surrogate

    try:
        config = _surrogate_config(args)
    except ValueError as err:
        print(f"stackjax serve: {err}", file=sys.stderr)
        return 2
    print(
        f"stackjax serve: a SIMULATED OpenAI-compatible API (not a language model) on "
        f"http://{args.host}:{args.port}/v1; usage and answers follow the response model.",
        flush=True,
    )
    surrogate.serve(config, host=args.host, port=args.port)
    return 0


def _probe(args: argparse.Namespace) -> int:
    import os

    import openai

    from .deploy import probes

    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        print("stackjax probe: set OPENAI_API_KEY (any value for a local server)", file=sys.stderr)
        return 2
    try:
        prompts = (
            probes.load_prompts(args.prompts)
            if args.prompts
            else probes.arithmetic_prompts(args.prompts_count, seed=args.seed)
        )
        grid = probes.action_grid(
            context=args.context_levels, verbosity=args.verbosity_levels, tools=args.tool_levels
        )
        planned = probes.plan(prompts, grid, models=args.model, samples=args.samples, repeats=args.repeats)
    except ValueError as err:
        print(f"stackjax probe: {err}", file=sys.stderr)
        return 2
    client = openai.AsyncOpenAI(
        base_url=args.base_url, api_key=key, max_retries=args.max_retries, timeout=args.timeout
    )
    report = probes.run_probes(
        client, planned, args.out, concurrency=args.concurrency, progress=not args.no_progress
    )
    print(
        f"probes planned {report.planned}, already in the log {report.already_logged}, "
        f"completed {report.completed}, failed {len(report.failed)} ({report.seconds:.1f} s) -> {args.out}"
    )
    for probe_id, reason in list(report.failed.items())[:5]:
        print(f"  failed {probe_id}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stackjax",
        description="Differentiable Stackelberg games in JAX, for governing LLM agents' token spend.",
    )
    parser.add_argument("--version", action="version", version=f"stackjax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="print versions and the JAX devices in use")
    info.set_defaults(run=_info)

    dem = commands.add_parser(
        "demo",
        help="train a controller on the calibrated simulator and compare it with fixed baselines",
    )
    dem.add_argument("--steps", type=int, default=300, help="training steps")
    dem.add_argument("--train-sessions", type=int, default=512, help="sessions per training batch")
    dem.add_argument("--eval-sessions", type=int, default=1000, help="fresh sessions per controller")
    dem.add_argument("--turns", type=int, default=3, help="turns per session")
    dem.add_argument("--seed", type=int, default=0)
    dem.add_argument("--plot", default="stackjax-demo.png", help="where to save the plot ('' for none)")
    dem.set_defaults(run=_demo)

    cal = commands.add_parser(
        "calibrate",
        help="fit the response model to call logs and report how well it predicts unseen tasks",
        description="Fit the response model (tokens and quality as functions of the action) to call logs: "
        "CSV in the real-api formats or JSONL logs of the governed client. Reports cell-level and per-call "
        "figures on --eval files, or by leave-one-exam-out without them.",
    )
    cal.add_argument(
        "--data", action="append", required=True, metavar="PATH", help="call log to fit (repeatable)"
    )
    cal.add_argument(
        "--eval", action="append", default=[], metavar="PATH", help="held-out call log (repeatable)"
    )
    cal.add_argument("--out", metavar="PATH", help="save the fitted response model here")
    cal.add_argument("--json", metavar="OUT", help="write the figures as JSON here")
    cal.add_argument(
        "--anchor-level",
        default="answer_only",
        choices=["answer_only", "concise", "chain_of_thought", "detailed", "none"],
        help="anchor each unseen (task, model)'s intercepts on its calls at this verbosity level and report "
        "on its other cells (default: answer_only); 'none' predicts unseen tasks from their type alone",
    )
    cal.add_argument(
        "--verbosity-prior",
        action="append",
        default=[],
        metavar="TASK=LOGIT",
        help="prior belief that going from answer-only to chain of thought changes TASK's quality logit "
        "by LOGIT (repeatable; for task types the logs do not cover). Default: no effect",
    )
    cal.add_argument("--steps", type=int, default=400, help="L-BFGS iterations per fit")
    cal.set_defaults(run=_calibrate)

    srv = commands.add_parser(
        "serve",
        help="serve a SIMULATED OpenAI-compatible Chat Completions API (offline stand-in)",
        description="An OpenAI-compatible Chat Completions server that simulates an LLM: usage fields and "
        "answers follow a response model (the calibrated one by default). It is a simulator, not a model.",
    )
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--response-model", metavar="PATH", help="a response model saved by calibrate --out")
    srv.add_argument("--seed", type=int, default=0)
    for fault in ("429", "500", "slow", "malformed"):
        srv.add_argument(
            f"--fault-{fault}", type=float, default=0.0, metavar="RATE", help=f"{fault} fault rate"
        )
    srv.add_argument("--slow-seconds", type=float, default=2.0)
    srv.add_argument("--tool-rounds", type=int, default=1, help="tool calls per user message when offered")
    srv.add_argument("--log", metavar="PATH", help="the server's own JSONL record of every request")
    srv.set_defaults(run=_serve)

    prb = commands.add_parser(
        "probe",
        help="run a grid of actions over prompts against an API and log the calls for calibrate",
        description="Probe an OpenAI-compatible endpoint (key from OPENAI_API_KEY) over a grid of actions; "
        "resumable: probes already in --out are skipped.",
    )
    prb.add_argument("--base-url", required=True)
    prb.add_argument("--model", action="append", required=True, help="model to probe (repeatable)")
    prb.add_argument("--out", required=True, metavar="PATH", help="the JSONL call log (appended)")
    prb.add_argument("--prompts", metavar="PATH", help="JSONL prompts (default: synthetic arithmetic)")
    prb.add_argument(
        "--prompts-count", type=int, default=12, help="synthetic prompts when --prompts is absent"
    )
    prb.add_argument("--context-levels", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    prb.add_argument("--verbosity-levels", type=float, nargs="+", default=[0.0, 1 / 3, 2 / 3, 1.0])
    prb.add_argument("--tool-levels", type=float, nargs="+", default=[0.0])
    prb.add_argument("--samples", type=int, default=1, help="answers drawn per call (n)")
    prb.add_argument("--repeats", type=int, default=1)
    prb.add_argument("--seed", type=int, default=0)
    prb.add_argument("--concurrency", type=int, default=8)
    prb.add_argument("--max-retries", type=int, default=4, help="the openai client's own retries")
    prb.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    prb.add_argument("--no-progress", action="store_true")
    prb.set_defaults(run=_probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
