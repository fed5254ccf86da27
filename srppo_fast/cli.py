"""`srppo-fast` command line: train | profile | config | bench | report | export | world."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

import yaml

from .errors import SrppoError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srppo-fast", description="Self-Rewarding PPO: SFT, then PPO with the "
                                "coherent reward log pi_SFT - log pi_PT.")
    # the `deepspeed` launcher passes --local_rank=N before the command; the rank comes from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run the stages of a config")
    t.add_argument("--config", required=True, help="YAML config (e.g. configs/quickstart.yaml)")
    t.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and the plan, exit")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. sft.optim.lr=5e-5")

    c = sub.add_parser("config", help="print the config reference (every key, type, default, help)")
    c.add_argument("--markdown", action="store_true", help="as a Markdown table (docs/config.md's reference)")
    c.add_argument("--update-docs", "--update-readme", metavar="FILE", dest="update_docs",
                   help="rewrite the table between the config-reference markers of this file (docs/config.md; "
                   "--update-readme is its earlier name)")

    b = sub.add_parser("bench", help="run the kernel and packing benchmarks (benchmarks/ of a source checkout)")
    b.add_argument("--op", default="all", choices=["all", *BENCHMARKS],
                   help="which benchmark (default: every one)")
    b.add_argument("--quick", action="store_true", help="small sizes, printed only (CI-safe)")
    b.add_argument("--providers", default="", help="comma-separated subset of providers (kernel benchmarks)")
    b.add_argument("--modes", default="", help="comma-separated subset of fwd,bwd,full (kernel benchmarks)")
    b.add_argument("--dry", action="store_true", help="print the rows without appending to benchmarks/results")

    f = sub.add_parser("profile", help="run N steps of a config's RL stage and break down where the time went")
    f.add_argument("--config", required=True, help="YAML config whose stages before the RL stage are trained")
    f.add_argument("--steps", type=int, default=5, help="RL steps to run (default 5; the first is warm-up)")
    f.add_argument("--trace", metavar="DIR", help="write a torch profiler trace of the steps into DIR")
    f.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. srppo.rollout.async=true")

    r = sub.add_parser("report", help="draw a run's curves (PNG) and one self-contained HTML page with "
                       "curves, eval table and samples (OUTPUT_DIR/report/index.html)")
    r.add_argument("output_dir", help="a run's output_dir")

    e = sub.add_parser("export", help="write a checkpoint as a plain Hugging Face directory (a LoRA adapter merged "
                       "into its base), which transformers and vLLM load as they are")
    e.add_argument("checkpoint", help="a stage's checkpoint directory (OUTPUT_DIR/checkpoints/STAGE)")
    e.add_argument("--out", required=True, help="directory to write (must not exist)")
    e.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its base (required for one)")
    e.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the weights' dtype (default fp32)")

    w = sub.add_parser("world", help="write the embedded world (JSONL splits + tokenizer) to a directory")
    w.add_argument("--out", required=True, help="directory to write")
    w.add_argument("overrides", nargs="*", metavar="key=value", help="world.* overrides, e.g. world.seed=1")
    return p


def cmd_train(args) -> int:
    from .config import to_dict
    from .config_load import load_config
    from .runner import describe_plan, preflight, run

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:  # every check a run makes before it writes anything, and nothing written
        checks = preflight(cfg, dry_run=True)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        print(describe_plan(cfg, checks))
        return 0
    from . import dist

    try:
        run(cfg)
        dist.barrier()  # no rank tears down its end while another still talks to it
    except RuntimeError as e:
        if _peer_failure_line(e) is not None:  # the launcher now stops the survivors with SIGTERM: this rank is
            for sig in (signal.SIGTERM, signal.SIGINT):  # already stopping, and says why in one line
                signal.signal(sig, signal.SIG_IGN)
        raise
    finally:
        _wind_down()
    return 0


def _wind_down() -> None:
    """A process group left to the interpreter's exit can abort it ("terminate called without an active
    exception" from gloo's worker threads), failing a run that finished: tear it down while Python is alive,
    after the vLLM samplers (their shutdown leaves the distributed state they joined)."""
    from . import dist
    from .rollout import shutdown_samplers

    shutdown_samplers()
    dist.destroy()


def cmd_profile(args) -> int:
    from . import dist
    from .errors import ConfigError
    from .profile import run_profile

    if args.steps < 1:
        raise ConfigError(f"--steps is {args.steps}; profile at least 1 step (the first is warm-up: 3 or more "
                          "give a steady-state median).")
    try:
        report = run_profile(args.config, args.overrides, args.steps, args.trace)
        dist.barrier()
    finally:
        _wind_down()
    if report:
        print(report)
    return 0


def reference_markdown() -> str:
    from .config import config_reference

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_ in config_reference():
        if tp == "section":
            lines.append(f"| **{key}** | section | | {help_} |")
        else:
            lines.append(f"| `{key}` | {tp} | `{default}` | {help_} |".replace("``", "` `"))
    return "\n".join(lines)


REFERENCE_MARKERS = ("<!-- config-reference:start -->", "<!-- config-reference:end -->")


def update_reference(path: str) -> None:
    """Rewrite the config reference between the REFERENCE_MARKERS of `path` (docs/config.md; written beside it,
    then renamed)."""
    from .io import atomic_write_text, read_text_file

    text = read_text_file(path, "--update-docs:", "give the Markdown file that holds the config-reference "
                          "markers (docs/config.md).")
    start, end = REFERENCE_MARKERS
    if start not in text or end not in text.split(start, 1)[-1]:
        raise SrppoError(f"--update-docs: '{path}' has no {start} ... {end} markers (start before end); add them "
                         "where the table goes.")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    try:
        atomic_write_text(path, f"{head}{start}\n{reference_markdown()}\n{end}{tail}")
    except OSError as e:
        raise SrppoError(f"--update-docs: cannot write '{path}' ({e.strerror or e}: {e.filename or path}); "
                         "check that this user may write it and create files in its directory.") from None


def cmd_config(args) -> int:
    from .config import config_reference

    if args.update_docs:
        update_reference(args.update_docs)
        return 0
    if args.markdown:
        print(reference_markdown())
        return 0
    for key, tp, default, help_ in config_reference():
        print(f"{key}  [{tp}]" + (f" = {default}" if tp != "section" else "") + f"\n    {help_}")
    return 0


def cmd_export(args) -> int:
    from .modeling import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out, merge=args.merge, dtype=args.dtype))
    return 0


def cmd_world(args) -> int:
    from .config_load import load_config
    from .world import build_world

    cfg = load_config(None, args.overrides)
    path = build_world(cfg.world, args.out)
    print(f"world written to {path}")
    return 0


BENCHMARKS = {"logprobs": "bench_logprobs", "linear_logprobs": "bench_linear_logprobs", "gae": "bench_gae",
              "ppo_loss": "bench_ppo_loss", "packing": "bench_packing"}


def _bench_selection(args, modules: dict) -> dict[str, list[str] | None]:
    """The argv each selected benchmark gets for --providers/--modes, checked before anything runs: a name no
    selected benchmark knows is an error listing the known ones; with --op all each kernel benchmark gets the
    names it knows (none: it is skipped)."""
    if args.op == "packing" and (args.providers or args.modes):
        raise SrppoError("bench --op packing takes neither --providers nor --modes (they pick kernel benchmark "
                         "variants); drop them.")
    kernels = {name: m for name, m in modules.items() if name != "packing"}
    argv = {name: [] for name in kernels}
    for flag, attr in (("providers", "PROVIDERS"), ("modes", "MODES")):
        requested = getattr(args, flag)
        if not requested:
            continue
        what = flag[:-1]
        wanted = [n.strip() for n in requested.split(",") if n.strip()]
        known = {name: list(getattr(m, attr)) for name, m in kernels.items()}
        unknown = [n for n in wanted if not any(n in k for k in known.values())]
        if unknown or not wanted:
            listing = "; ".join(f"{name}: {', '.join(k)}" for name, k in known.items()) if len(known) > 1 else \
                ", ".join(next(iter(known.values())))
            bad = f"unknown {what} {', '.join(unknown)}" if unknown else f"'{requested}' names no {what}"
            raise SrppoError(f"--{flag}: {bad} for bench --op {args.op}; known {flag}: {listing}.")
        for name, k in known.items():
            mine = [n for n in wanted if n in k]
            argv[name] = None if argv[name] is None or not mine else argv[name] + [f"--{flag}={','.join(mine)}"]
    return argv


def cmd_bench(args) -> int:
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "common.py").is_file():
        raise SrppoError("srppo-fast bench runs the scripts in benchmarks/ of a source checkout; install the "
                         "package from one with `pip install -e .`.")
    sys.path.insert(0, str(root))
    names = list(BENCHMARKS) if args.op == "all" else [args.op]
    modules = {name: importlib.import_module(f"benchmarks.{BENCHMARKS[name]}") for name in names}
    selection = _bench_selection(args, modules)  # every check before the first benchmark runs
    for name, module in modules.items():
        if name == "packing":
            module.main(["--quick"] if args.quick else [])
            continue
        if selection[name] is None:
            print(f"bench {name}: skipped (none of the requested providers/modes is one of its own: providers "
                  f"{', '.join(module.PROVIDERS)}; modes {', '.join(module.MODES)})")
            continue
        argv = [flag for flag, on in (("--quick", args.quick), ("--dry", args.dry)) if on]
        module.main(argv + selection[name])
    return 0


def cmd_report(args) -> int:
    from .report import make_report

    for path in make_report(args.output_dir):
        print(path)
    return 0


def _peer_failure_line(e: RuntimeError) -> str | None:
    """One line for a collective that failed because another rank of the launch is gone (its process died or was
    killed: gloo's "Connection closed by peer", NCCL's remote errors), else None (a bug: its traceback stays)."""
    from . import dist

    text = " ".join(str(e).split())
    peer = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
            "remote process exited", "NCCL communicator was aborted", "Timed out waiting")
    if not dist.launched() or not any(p in text for p in peer):
        return None
    me, world = dist.env_rank(), dist.env_world_size()
    other = f"rank {1 - me}" if world == 2 else f"another of ranks 0-{world - 1}"
    return (f"rank {me}: {other} of this launch is gone (its process died or was killed; the launcher's log says "
            f"which and why), so this rank stopped too ({text[:160]}). The last complete checkpoint in each stage's "
            "checkpoints/ directory is safe: run the same command to resume from it.")


def _os_error_line(e: OSError) -> str:
    """One line for an OSError: the path(s) and the reason when it names a file, else its message."""
    if e.filename is not None:
        path = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"cannot read or write {path}: {e.strerror or e}; check the path and its permissions."
    message = e.strerror or " ".join(str(e).split()) or type(e).__name__  # library messages can span lines
    return f"{message} ({type(e).__name__}); check the paths this command uses and the free disk space."


_signalled: list[str] = []


def _sigterm_like_sigint(signum, frame) -> None:
    """SIGTERM outside a stage's loop does what SIGINT does there (Python's KeyboardInterrupt): one line and exit
    130, rather than an exit 143 without a word. Inside a loop, the stage's SignalGuard handles both alike."""
    _signalled.append(signal.Signals(signum).name)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"train": cmd_train, "config": cmd_config, "world": cmd_world, "export": cmd_export, "report": cmd_report,
               "bench": cmd_bench, "profile": cmd_profile}[args.command]
    previous = None
    _signalled.clear()
    if threading.current_thread() is threading.main_thread():
        previous = (signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, _sigterm_like_sigint))
    try:
        return handler(args)
    except SrppoError as e:
        print(f"srppo-fast: error: {e}", file=sys.stderr)
        code = getattr(e, "exit_code", 2)
        from .rollout import sampler_hung

        if sampler_hung():  # a thread stuck inside vLLM would hold the interpreter's exit: leave now
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except KeyboardInterrupt:
        what = _signalled[-1] if _signalled else "SIGINT"
        print(f"srppo-fast: interrupted by {what} outside a training loop (loading, evaluating or saving): what the "
              "last save holds is kept; run the same command to resume.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit goes nowhere
        return 0
    # Last resort for what no command turned into an SrppoError: an OS error (a file that cannot be read or
    # written, a full disk) or a file that is not UTF-8 is the user's to fix, so one line, not a traceback.
    # Every other exception is a bug and keeps its traceback.
    except OSError as e:
        print(f"srppo-fast: error: {_os_error_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a peer rank that died takes the process group down with it: one line, not gloo's
        line = _peer_failure_line(e)
        if line is None:
            raise
        print(f"srppo-fast: error: {line}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        byte = bytes(e.object[e.start:e.start + 1]).hex()
        print(f"srppo-fast: error: a file is not {e.encoding} text (byte 0x{byte} at offset {e.start}: {e.reason}); "
              "save the inputs (config, data, docs/config.md) as UTF-8.", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])


if __name__ == "__main__":
    sys.exit(main())
