"""The command line of ``python -m ptpeft_fast.train``: arguments, the config, the output folder,
and one line with an exit status for every way a run can stop."""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import run_folder
from .config import ConfigError, apply_override, dump_config, load_config, validate

__all__ = ["main", "build_parser", "console"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m ptpeft_fast.train",
        description="Two-stage PT-PEFT (prefix, then LoRA/Adapter/full) training and evaluation. "
                    "With no --config/--resume: the built-in demo on tiny-blip2 + synthetic-shapes.")
    p.add_argument("--config", help="YAML config (sections model, data, stage1, stage2, eval, output, train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stage1.lr=1e-3 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--output", metavar="DIR", help="output directory (same as --set output.dir=DIR)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="drop records whose image is missing or unreadable and report the count")
    p.add_argument("--quick", action="store_true",
                   help="the short version: the demo in ~2 minutes, or a --config preset's 'quick' overrides")
    return p


def _run_reporting_stops(run) -> int:
    """Run; an interruption (resumable, exit 130), a non-finite loss (exit 3) or damaged saved state
    (exit 2) is reported on stderr."""
    from .loop import Interrupted, NonFinite
    from .run_folder import DamagedState
    try:
        run()
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except NonFinite as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except DamagedState as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _os_error(e: OSError) -> str:
    """One line for an operating-system fault, with what to do about it."""
    import errno
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device{where}; the last complete checkpoint is kept: free space, then "
                "continue with --resume <output folder>")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not allowed to write{where}: {e.strerror}; choose another --output or fix the folder's permissions"
    return f"{e.strerror or e}{where}"


def _check_output_dir(out: str) -> None:
    """The output folder is a folder that this process can write, before any work starts."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output folder {out!r} is a file; give a folder path with --output")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".ptpeft-write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {out!r} ({e.strerror}); choose another --output") from None


def _not_a_run(path: str) -> str:
    """Why ``path`` cannot be resumed, saying what it is when that can be told."""
    if not os.path.exists(path):
        return "no such folder"
    if not os.path.isdir(path):
        return "a file, not a run folder"
    if os.path.isfile(os.path.join(path, "ptpeft_config.json")):
        return (f"a checkpoint written by ptpeft_fast.save, not a run folder: load it with "
                f"ptpeft_fast.load(model, {path!r})")
    runs = sorted(d for d in os.listdir(path) if run_folder.is_run(os.path.join(path, d)))
    if runs:
        return (f"a folder of runs ({', '.join(runs)}; the demo writes one per method): resume one with --resume "
                f"{os.path.join(path, runs[0])}, or rerun the same command with --output {path} to continue them all")
    return f"no {run_folder.CONFIG} there (not a ptpeft_fast run folder)"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code. Under torchrun the process group is left before
    returning (train/distributed.py's shutdown_distributed says why)."""
    from .distributed import group_failure, shutdown_distributed
    code = 1
    try:
        code = _main(argv)
    except Exception as e:
        line = group_failure(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
    finally:
        shutdown_distributed(ok=code == 0)
    return code


def console() -> None:
    """``python -m ptpeft_fast.train`` and ``ptpeft-train``: :func:`main`, then exit with its status.

    Under torchrun a worker leaves with ``os._exit`` once its output is flushed: its files are
    written and closed and its process group destroyed by then, and interpreter shutdown is where
    gloo's threads can still end a finished rank in ``std::terminate`` (SIGABRT; seen once in
    about 100 two-process runs under load even after the group was destroyed)."""
    import logging

    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # weight-loading bars would drown the short log
    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output.dir={args.output}")
    if args.skip_bad_images:
        overrides.append("data.skip_bad_images=true")
    try:
        if args.config is None and args.resume is None:
            from .demo import demo_config, run_demo
            if args.print_config:
                print(dump_config(demo_config(args.quick, overrides)), end="")
                return 0
            if args.output:
                _check_output_dir(args.output)
            run_demo(quick=args.quick, out_dir=args.output, user_overrides=overrides)
            return 0
        if args.resume:
            if args.quick:
                raise ConfigError("--quick goes with --config: a resumed run keeps the settings it started with "
                                  f"(those in {run_folder.config_path(args.resume)}); drop --quick")
            saved = run_folder.config_path(args.resume)
            if not os.path.exists(saved):
                raise ConfigError(f"--resume {args.resume}: {_not_a_run(args.resume)}")
            cfg = load_config(saved)
            cfg["train"]["interrupt_after_steps"] = None  # a test hook, not part of the run
            for o in overrides:
                apply_override(cfg, o)
            validate(cfg)
            out = args.resume
        else:
            cfg = load_config(args.config, overrides, quick=args.quick)
            out = cfg["output"]["dir"] or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
            cfg["output"]["dir"] = out
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        _check_output_dir(out)
        if cfg["experiment"]["methods"]:
            # a multi-run experiment: each run resumes from its own sub-folder, so running the
            # same command again (or --resume DIR) continues where it stopped
            from .experiment import run_experiment
            os.makedirs(out, exist_ok=True)
            run_folder.write_config(out, dump_config(cfg))
            return _run_reporting_stops(lambda: run_experiment(cfg, out))
        from .tasks import make_run
        if not args.resume and run_folder.has_progress(out) and not cfg["output"]["overwrite"]:
            raise ConfigError(f"output.dir {out!r} already holds a run; use --resume {out} or "
                              "--set output.overwrite=true")
        if not args.resume and cfg["output"]["overwrite"] and int(os.environ.get("RANK", "0")) == 0:
            run_folder.reset(out)
        return _run_reporting_stops(lambda: make_run(cfg, out, resume=bool(args.resume)).execute())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment, not the config: a full disk, a read-only folder, ...
        print(f"error: {_os_error(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        from ..data import DataError
        if isinstance(e, DataError):
            print(f"data error: {e}", file=sys.stderr)
            return 2
        raise
