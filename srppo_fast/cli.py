"""`srppo-fast` command line: train | config | bench | report | world."""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from .errors import SrppoError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srppo-fast", description="Self-Rewarding PPO: SFT, then PPO with the "
                                "coherent reward log pi_SFT - log pi_PT.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run the stages of a config")
    t.add_argument("--config", required=True, help="YAML config (e.g. configs/quickstart.yaml)")
    t.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and the plan, exit")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. sft.optim.lr=5e-5")

    c = sub.add_parser("config", help="print the config reference (every key, type, default, help)")
    c.add_argument("--markdown", action="store_true", help="as a Markdown table (the README's reference)")
    c.add_argument("--update-readme", metavar="README", help="rewrite the table between the config-reference "
                   "markers of this file")

    b = sub.add_parser("bench", help="run the kernel and packing benchmarks (benchmarks/ of a source checkout)")
    b.add_argument("--op", default="all", choices=["all", *BENCHMARKS],
                   help="which benchmark (default: every one)")
    b.add_argument("--quick", action="store_true", help="small sizes, printed only (CI-safe)")
    b.add_argument("--providers", default="", help="comma-separated subset of providers (kernel benchmarks)")
    b.add_argument("--modes", default="", help="comma-separated subset of fwd,bwd,full (kernel benchmarks)")
    b.add_argument("--dry", action="store_true", help="print the rows without appending to benchmarks/results")

    r = sub.add_parser("report", help="draw the training curves of a run as PNG (OUTPUT_DIR/report/)")
    r.add_argument("output_dir", help="a run's output_dir")

    w = sub.add_parser("world", help="write the embedded world (JSONL splits + tokenizer) to a directory")
    w.add_argument("--out", required=True, help="directory to write")
    w.add_argument("overrides", nargs="*", metavar="key=value", help="world.* overrides, e.g. world.seed=1")
    return p


def cmd_train(args) -> int:
    from .config import load_config, to_dict
    from .runner import describe_plan, run

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        print(describe_plan(cfg))
        return 0
    run(cfg)
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


README_MARKERS = ("<!-- config-reference:start -->", "<!-- config-reference:end -->")


def cmd_config(args) -> int:
    from .config import config_reference
    from .io import atomic_write_text

    if args.update_readme:
        text = open(args.update_readme, encoding="utf-8").read()
        start, end = README_MARKERS
        if start not in text or end not in text:
            raise SrppoError(f"{args.update_readme} has no {start} ... {end} markers; add them where the table "
                             "goes.")
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        atomic_write_text(args.update_readme, f"{head}{start}\n{reference_markdown()}\n{end}{tail}")
        return 0
    if args.markdown:
        print(reference_markdown())
        return 0
    for key, tp, default, help_ in config_reference():
        print(f"{key}  [{tp}]" + (f" = {default}" if tp != "section" else "") + f"\n    {help_}")
    return 0


def cmd_world(args) -> int:
    from .config import load_config
    from .world import build_world

    cfg = load_config(None, args.overrides)
    path = build_world(cfg.world, args.out)
    print(f"world written to {path}")
    return 0


BENCHMARKS = {"logprobs": "bench_logprobs", "linear_logprobs": "bench_linear_logprobs", "gae": "bench_gae",
              "ppo_loss": "bench_ppo_loss", "packing": "bench_packing"}


def cmd_bench(args) -> int:
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "common.py").is_file():
        raise SrppoError("srppo-fast bench runs the scripts in benchmarks/ of a source checkout; install the "
                         "package from one with `pip install -e .`.")
    sys.path.insert(0, str(root))
    for name in (list(BENCHMARKS) if args.op == "all" else [args.op]):
        module = importlib.import_module(f"benchmarks.{BENCHMARKS[name]}")
        if name == "packing":
            module.main(["--quick"] if args.quick else [])
            continue
        argv = [flag for flag, on in (("--quick", args.quick), ("--dry", args.dry)) if on]
        argv += [f"--providers={args.providers}"] if args.providers else []
        argv += [f"--modes={args.modes}"] if args.modes else []
        module.main(argv)
    return 0


def cmd_report(args) -> int:
    from .report import make_report

    for path in make_report(args.output_dir):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"train": cmd_train, "config": cmd_config, "world": cmd_world, "report": cmd_report,
               "bench": cmd_bench}[args.command]
    try:
        return handler(args)
    except SrppoError as e:
        print(f"srppo-fast: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("srppo-fast: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit goes nowhere
        return 0


if __name__ == "__main__":
    sys.exit(main())
