"""`lyra`: start, inspect, talk to and stop a Lyra Runtime stack."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import sys
import time
from pathlib import Path

from shared.cli import stack
from shared.cli.live_status import LiveStatus, progress_printer, terminal_stream
from shared.cli.render import VoiceText, print_summary, render_status, save_image
from shared.client import Client, LyraError, find_stack
from shared.config.paths import ProjectFileMissing, default_config
from shared.config.schema import ConfigError, LyraConfig, load_config
from shared.config.units import GB, format_gb
from shared.rundir import leftovers, stack_record
from shared.wire.messages import (
    DoneEvent,
    ImageEvent,
    RouteEvent,
    StageFinishedEvent,
    StageRestartedEvent,
    StageStartedEvent,
    TokenEvent,
)
from shared.wire.names import PROGRAMS


class InputError(Exception):
    """What the user gave on the command line cannot be used (an unreadable file, no text); one line says why."""


CONFIG_HELP = "the stack's TOML config (default: the embedded default, configs/default.toml)"


def config_of(args: argparse.Namespace) -> LyraConfig:
    """-c CONFIG, else the embedded default: one rule for every command that takes a config, said when it applies."""
    if args.config:
        return load_config(args.config)
    path = default_config()
    print(f"lyra: no -c CONFIG: using the embedded default, {path}", file=sys.stderr)
    return load_config(path)


def cmd_up(args: argparse.Namespace) -> int:
    config = config_of(args)
    stack.preflight(config)  # a busy port or an unset key is the first thing said, before any plan or load
    from shared.planning.plan import make_plan, render_table

    plan = make_plan(config)
    if not plan.ok:
        print(render_table(plan))
        if not args.force:
            print("lyra: this config does not fit its GPUs (above); fix it or pass --force", file=sys.stderr)
            return 2
    print(f"starting Lyra Runtime with {config.source} (run directory {config.run_dir()})", flush=True)
    with LiveStatus(terminal_stream()) as live:  # on a terminal: one line with the elapsed seconds
        status = stack.up(config, args.timeout, progress_printer(live))
    print(render_status(status))
    url = stack.gateway_url(config.run_dir())
    print(f"OpenAI-compatible API: {url}" if url else "no HTTP API: [gateway] enabled = false in this config")
    return 0


def target_run_dir(args: argparse.Namespace) -> Path:
    """The run directory a command acts on: --run-dir, else -c CONFIG's, else the stack `lyra chat` would use."""
    if getattr(args, "run_dir", None):
        return Path(args.run_dir)
    if getattr(args, "config", None):
        return load_config(args.config).run_dir()
    record = find_stack()
    if "run_dir" not in record:
        raise InputError("LYRA_ENDPOINT names an endpoint, not a stack: pass --run-dir or -c CONFIG")
    return Path(record["run_dir"])


def cmd_down(args: argparse.Namespace) -> int:
    if args.run_dir or args.config:
        run_dir = target_run_dir(args)
    elif os.environ.get("LYRA_ENDPOINT") and not os.environ.get("LYRA_RUN_DIR"):
        raise InputError("LYRA_ENDPOINT names an endpoint, not a stack: pass --run-dir or -c CONFIG")
    else:  # the stack `lyra chat` would use, live or not: a stack whose supervisord died may have left processes
        run_dir = stack_record.current_run_dir()
    stopped = stack.down(run_dir, args.timeout)
    print(f"stopped {stopped}" if stopped else f"no stack was running in {run_dir}")
    if not leftovers.can_scan():
        print(f"note: {leftovers.SCAN_UNAVAILABLE}")
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    run_dir = target_run_dir(args)
    done = stack.supervisorctl(run_dir, *args.args)
    if args.args[:1] != ["status"]:
        print((done.stdout + done.stderr).rstrip())
        return done.returncode
    text, code = stack.ctl_status(run_dir, done)
    print(text)
    return code


def endpoint_of(args: argparse.Namespace) -> str:
    """--endpoint, else the live stack's (--run-dir, $LYRA_RUN_DIR, the one started last, the default)."""
    return args.endpoint or find_stack(args.run_dir)["client_endpoint"]


def cmd_status(args: argparse.Namespace) -> int:
    record = {"client_endpoint": args.endpoint} if args.endpoint else find_stack(args.run_dir)
    with Client(record["client_endpoint"]) as client:
        status = client.status(timeout_s=args.timeout)
    if args.json:
        print(status.model_dump_json(indent=2))
        return 0
    url = stack.gateway_url(Path(record["run_dir"])) if "run_dir" in record else None
    print(render_status(status) + (f"\nOpenAI-compatible API: {url}" if url else ""))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    run_dir = target_run_dir(args)
    log = run_dir / "logs" / (stack.PREVIOUS_LOGS if args.previous else "") / f"{args.service}.log"
    if not log.exists():
        print(f"no log at {log}", file=sys.stderr)
        return 1
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(lines[-args.lines:]))
    if args.follow:
        with log.open(errors="replace") as fh:
            fh.seek(0, 2)
            while True:
                line = fh.readline()
                if line:
                    print(line, end="", flush=True)
                else:
                    time.sleep(0.2)
    return 0


def prompt_text(args: argparse.Namespace) -> str:
    """The turn's text: the argument, `-` for stdin, or --file PATH (no argv length limit either way)."""
    if args.file is not None and args.text is not None:
        raise InputError("give the text as an argument or with --file, not both")
    if args.file is not None:
        text = sys.stdin.read() if args.file == "-" else read_input(args.file, "prompt file").decode(
            "utf-8", errors="replace")
    elif args.text is None:
        raise InputError("no text: pass it as an argument, `-` to read stdin, or --file PATH")
    else:
        text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise InputError("the prompt is empty")
    return text


def read_input(path: str, what: str) -> bytes:
    """A file the user named, or InputError with the reason in one line."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def cmd_chat(args: argparse.Namespace) -> int:
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed,
               "stop": args.stop}
    options = {k: v for k, v in options.items() if v is not None}
    text = prompt_text(args)
    image = read_input(args.image, "image") if args.image else None
    done = None
    answer = VoiceText()
    # A live status line on a terminal (not with -v, whose raw stage lines would break it; not with --json).
    live = LiveStatus(None if args.verbose or args.no_status else terminal_stream())
    with Client(endpoint_of(args), timeout_s=args.timeout) as client, live:
        for event in client.stream(text, image=image, specialist=args.specialist, **options):
            live.feed(event)
            if args.json:
                done = event if isinstance(event, DoneEvent) else done
                continue
            if isinstance(event, (TokenEvent, StageRestartedEvent)):
                print(answer.feed(event), end="", flush=True)
                if isinstance(event, StageRestartedEvent) and event.stage != "voice":
                    live.finish()
                    print(f"[{event.service} restarted during {event.stage}: running it again]", file=sys.stderr)
            elif isinstance(event, RouteEvent) and args.verbose:
                print(f"[route -> {event.specialist}]", file=sys.stderr)
            elif isinstance(event, (StageStartedEvent, StageFinishedEvent)) and args.verbose:
                print(f"[{event.type.removesuffix('_event')} {event.stage}]", file=sys.stderr)
            elif isinstance(event, ImageEvent):
                where = save_image(event, args.out) if args.out else "not saved; pass --out DIR"
                print(f"\n[image {event.image.width}x{event.image.height}: {where}]", file=sys.stderr)
            elif isinstance(event, DoneEvent):
                done = event
    assert done is not None
    if args.json:
        payload = done.model_dump(mode="json", exclude={"image"})
        if done.image is not None and args.out:
            payload["image_path"] = str(save_image(ImageEvent(image=done.image), args.out))
        print(json.dumps(payload, indent=2))
    else:
        print()
        print_summary(done)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from shared.planning.plan import make_plan, render_table

    config = config_of(args)
    plan = make_plan(config)
    cache = weight_cache_report(config, plan)
    if args.json:
        print(json.dumps({**json.loads(plan.to_json()), "weight_cache": cache}, indent=2))
    else:
        print(render_table(plan))
        print(render_weight_cache(cache))
    return 0 if plan.ok else 1


def weight_cache_report(config, plan) -> dict:
    """The host weight cache's size and which specialists' weights it can hold at once."""
    weights = {p.name: p.estimate.weights for p in plan.placements if p.role == "specialist"}
    size = int(config.weight_cache.size_gb * GB)
    quantized = sorted(n for n, e in config.specialists.items() if e.quantization == "bnb-int8")  # others are cached
    cacheable = {n: b for n, b in weights.items() if n not in quantized}
    return {"size_bytes": size, "pinned": config.weight_cache.pin, "specialist_weight_bytes": weights,
            "holds_all": size > 0 and sum(cacheable.values()) <= size,
            "too_large": sorted(name for name, b in cacheable.items() if size and b > size),
            "not_cached_quantized": quantized}


def render_weight_cache(cache: dict) -> str:
    """One paragraph about the host weight cache."""
    if not cache["size_bytes"]:
        return "\nhost weight cache: off (weight_cache.size_gb = 0): every swap reloads from the checkpoint"
    held = ", ".join(f"{n} {b / GB:.1f}" for n, b in cache["specialist_weight_bytes"].items())
    verdict = "holds every cacheable specialist at once" if cache["holds_all"] else "evicts least recently used"
    extra = f"; too large to cache: {', '.join(cache['too_large'])}" if cache["too_large"] else ""
    if cache["not_cached_quantized"]:
        extra += f"; bitsandbytes int8, so reloaded on every swap: {', '.join(cache['not_cached_quantized'])}"
    return (f"\nhost weight cache: {format_gb(cache['size_bytes'])} "
            f"({'pinned' if cache['pinned'] else 'pageable'}) of host RAM, {verdict}{extra}\n"
            f"  specialist weights (GB): {held}")


def cmd_doctor(args: argparse.Namespace) -> int:
    from shared.cli.doctor import diagnose, render

    checks = diagnose(config_of(args))
    print(render(checks))
    failed = [c for c in checks if c.status == "fail"]
    print(f"\n{len(failed)} check(s) failed" if failed else "\nall checks passed")
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from shared.cli.demo import QUICK_SCRIPT, SCRIPT, run_demo

    return run_demo(args.config, args.timeout, args.out, QUICK_SCRIPT if args.quick else SCRIPT)


RUN_DIR_HELP = "the stack's run directory (default: $LYRA_RUN_DIR, else the stack started last)"


def cmd_keys(args: argparse.Namespace) -> int:
    from shared.cli.keys import keys_command

    return keys_command(args.config, args.dir, tuple(args.client or ()), args.force)


def cmd_route(args: argparse.Namespace) -> int:
    from shared.cli.route_report import run_route

    return run_route(config_of(args), args.text, args.json)


def build_parser() -> argparse.ArgumentParser:
    """The `lyra` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lyra", description="Lyra Runtime: router -> specialist -> voice serving",
        epilog="Every command that takes a config (-c CONFIG) uses the embedded default, configs/default.toml, "
               "when none is given; `down -c CONFIG` picks the stack to stop.")
    parser.add_argument("--version", action="version", version=f"lyra {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start the stack under supervisord and wait until every service registered")
    p.add_argument("-c", "--config", help=CONFIG_HELP)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for readiness (model loads)")
    p.add_argument("--force", action="store_true", help="start even when `lyra plan` says it does not fit")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop every service of a stack (default: the one `lyra chat` uses)")
    p.add_argument("-c", "--config", help="stop the stack of this config's run directory")
    p.add_argument("--run-dir", help=RUN_DIR_HELP)
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("ctl", help="supervisorctl for a stack: `lyra ctl status`, `lyra ctl restart router`")
    p.add_argument("--run-dir", help=RUN_DIR_HELP)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_ctl)
    p = sub.add_parser("status", help="services, resident models, per-GPU ledger, queue")
    p.add_argument("--json", action="store_true")
    p.add_argument("--endpoint")
    p.add_argument("--run-dir", help=RUN_DIR_HELP)
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("chat", help="send one turn; streams the answer")
    p.add_argument("text", nargs="?", help="the turn's text; `-` reads it from stdin")
    p.add_argument("--file", help="read the turn's text from this file (`-`: stdin)")
    p.add_argument("--specialist", help="force a specialist (skips the router)")
    p.add_argument("--image", help="attach an image file")
    p.add_argument("--out", help="directory to save a generated image in")
    p.add_argument("--json", action="store_true", help="print the final result as JSON")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", metavar="TEXT", help="end the reply before TEXT (repeatable)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--endpoint")
    p.add_argument("--run-dir", help=RUN_DIR_HELP)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print each stage's start and end and the route as plain lines on stderr (no live status)")
    p.add_argument("--no-status", action="store_true",
                   help="no live status line on a terminal (it is never drawn into a pipe)")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("plan", help="per-GPU memory plan of a config, computed from the checkpoints; exit 1 if it "
                                     "cannot run")
    p.add_argument("-c", "--config", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("doctor", help="check GPUs, topology, attention, packages and placement for a config")
    p.add_argument("-c", "--config", help=CONFIG_HELP)
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("demo", help="start the embedded default, hold a short scripted conversation, stop")
    p.add_argument("-c", "--config", help=CONFIG_HELP)
    p.add_argument("--out", default="lyra-demo-images", help="directory for the images the artist makes")
    p.add_argument("--quick", action="store_true", help="four turns, one for each specialist, instead of six")
    p.add_argument("--timeout", type=float, default=600.0)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("keys", help="make CurveZMQ key files: the coordinator's, one per worker, one per client")
    p.add_argument("-c", "--config", help="write to this config's runtime.keys_dir (default ~/.config/lyra/keys)")
    p.add_argument("--dir", help="write here instead")
    p.add_argument("--client", action="append", metavar="NAME", help="a client key pair to make (repeatable; "
                   "default: one named client)")
    p.add_argument("--force", action="store_true", help="replace existing keys")
    p.set_defaults(func=cmd_keys)
    p = sub.add_parser("route", help="how the router scores a turn (scores, nearest examples); no stack needed")
    p.add_argument("text", nargs="+", help="one or more turns to route")
    p.add_argument("-c", "--config", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="one JSON object per turn")
    p.set_defaults(func=cmd_route)
    p = sub.add_parser("logs", help="print a service's log")
    p.add_argument("service", choices=PROGRAMS)
    p.add_argument("-n", "--lines", type=int, default=50)
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--previous", action="store_true", help="the log of the stack that ran in this run directory "
                   "before the current one (`lyra up` sets it aside)")
    p.add_argument("--run-dir", help=RUN_DIR_HELP)
    p.set_defaults(func=cmd_logs)
    return parser


def package_version() -> str:
    """The installed lyra-runtime's version."""
    try:
        return importlib.metadata.version("lyra-runtime")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run from a source tree)"


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    try:
        code = run(argv)
        sys.stdout.flush()  # here, not at exit: a reader that left is noticed below
        return code
    except BrokenPipeError:
        # `lyra status | head`: the reader left. Stop quietly, as a Unix filter does; stdout goes to /dev/null so
        # the interpreter's final flush has nowhere to fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def run(argv: list[str] | None) -> int:
    """Parse `argv` and run its command; errors a person can act on become one line and an exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, stack.StackError, InputError, ProjectFileMissing) as exc:
        print(f"lyra: {exc}", file=sys.stderr)
        return 2
    except LyraError as exc:
        print(f"lyra: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

