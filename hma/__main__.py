"""The one command line: `python -m hma <command>`; each command is a few lines over the library."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time

from hma.config import EngineConfig, HostConfig, RouterConfig, add_flags, from_flags
from hma.errors import HMAError


def _generate(args: argparse.Namespace) -> None:
    from hma.engine import LLM
    from hma.sampling import SamplingParams

    llm = LLM(**dataclasses.asdict(from_flags(args, EngineConfig)))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    t0 = time.perf_counter()
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - t0
    print(out.text)
    print(f"[{len(out.prompt_token_ids)} prompt tokens, {len(out.token_ids)} generated, "
          f"finish_reason={out.finish_reason}, ttft={out.metrics.ttft * 1e3:.0f} ms, "
          f"total={elapsed:.2f} s]", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    from hma.async_engine import AsyncEngine
    from hma.engine import LLMEngine, warm_up
    from hma.router import Router, api_keys

    engine = LLMEngine.from_config(from_flags(args, EngineConfig))
    warm_up(engine)
    backend = AsyncEngine(engine)
    backend.start()
    router = Router(backend, engine.tokenizer, args.served_model_name or args.model, api_keys=api_keys(args.api_key))
    try:
        web.run_app(router.app(), host=args.host, port=args.port)
    finally:
        backend.stop()


def _prefill(args: argparse.Namespace) -> None:
    from hma.prefill import serve_prefill

    asyncio.run(serve_prefill(from_flags(args, EngineConfig), from_flags(args, HostConfig)))


def _decode(args: argparse.Namespace) -> None:
    from hma.decode import serve_decode

    asyncio.run(serve_decode(from_flags(args, EngineConfig), from_flags(args, HostConfig)))


def _router(args: argparse.Namespace) -> None:
    from hma.router import serve_router

    asyncio.run(serve_router(from_flags(args, RouterConfig)))


def _demo(args: argparse.Namespace) -> None:
    from hma.demo import run_demo

    run_demo(args)


def _fetch_demo_model(args: argparse.Namespace) -> None:
    from hma.checkpoint import fetch_demo_model

    print(fetch_demo_model(force=args.force))


def _bench(args: argparse.Namespace) -> None:
    import importlib

    importlib.import_module(f"hma.bench.{args.name}").main(args.extra)


def _eval(args: argparse.Namespace) -> None:
    from hma.eval import main

    main(args.extra)


def _plan(args: argparse.Namespace) -> None:
    from hma.bench.plan import main

    main(args.extra)


def _chaos(args: argparse.Namespace) -> None:
    from hma.chaos import main

    main(args.extra)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hma", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="complete one prompt offline and print it")
    add_flags(gen, EngineConfig)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default here)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(run=_generate)

    serve = commands.add_parser("serve", help="one colocated engine behind the OpenAI API")
    add_flags(serve, EngineConfig)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="the model name clients send")
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 "
                                                       "(comma-separated keys; default: $HMA_API_KEY)")
    serve.set_defaults(run=_serve)

    for role, run in (("prefill", _prefill), ("decode", _decode)):
        host = commands.add_parser(role, help=f"the {role} host of disaggregated serving")
        add_flags(host, EngineConfig)
        add_flags(host, HostConfig)
        host.set_defaults(run=run)
    router = commands.add_parser("router", help="the OpenAI-compatible API in front of prefill and decode hosts")
    add_flags(router, RouterConfig)
    router.set_defaults(run=_router)

    demo = commands.add_parser("demo", help="the three roles as local processes with the demo model; one chat")
    demo.add_argument("--prompt", default="What is the capital of France?")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.add_argument("--prefill-dtype", default="fp8", help="the prefill host's precision (bf16 | fp8 | int8 | bfp8)")
    demo.add_argument("--kv-dtype", default="int8", help="the KV format on the wire and in both caches")
    demo.add_argument("--serve", action="store_true", help="keep the three running and print the URL")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="run a benchmark: speed, attention, compiled, matvec, profile, steps, serve, stream, systems, link, plots, prefill, outliers, transfer",
                                add_help=False)
    bench.add_argument("name", choices=["speed", "attention", "compiled", "matvec", "profile", "steps", "serve", "stream", "systems", "link", "plots", "prefill", "outliers", "transfer"])
    bench.set_defaults(run=_bench)

    quality = commands.add_parser("eval", help="quality of prefill precisions and KV formats",
                                  add_help=False)
    quality.set_defaults(run=_eval)

    plan = commands.add_parser("plan", help="goodput per dollar of deployments, by simulation", add_help=False)
    plan.set_defaults(run=_plan)

    chaos = commands.add_parser("chaos", help="faults, kills and corrupt frames against a local cluster",
                                add_help=False)
    chaos.set_defaults(run=_chaos)

    fetch = commands.add_parser("fetch-demo-model", help="download and convert SmolLM2-135M-Instruct")
    fetch.add_argument("--force", action="store_true", help="convert again even if cached")
    fetch.set_defaults(run=_fetch_demo_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    # bench, eval, plan and chaos take their own flags, which their own parsers read from what is left over.
    args, args.extra = parser.parse_known_args(argv)
    if args.extra and args.command not in ("bench", "eval", "plan", "chaos"):
        parser.error(f"unrecognized arguments: {' '.join(args.extra)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        args.run(args)
    except (HMAError, ValueError) as exc:  # bad flags or input: one line, not a traceback
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
