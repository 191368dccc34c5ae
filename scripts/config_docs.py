"""Write docs/configuration.md from the pydantic models in shared/config/schema.py.

    python scripts/config_docs.py           # (re)write docs/configuration.md
    python scripts/config_docs.py --check   # exit 1 when docs/configuration.md differs from what this writes

Every setting gets its type (with its bounds), default, unit and a sentence. The sentence is the field's
`description=` when it has one, else the sentence `DESCRIPTIONS` below holds for it followed by the comment
on its line or the comment block right above it in schema.py. A setting with neither makes
`missing_descriptions()` non-empty, which tests/unit/test_config_docs.py turns into a failure.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import re
import sys
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import schema  # noqa: E402
from shared.wire.names import WORKER_SERVICES  # noqa: E402

SCHEMA_FILE = ROOT / "shared" / "config" / "schema.py"
DOC_FILE = ROOT / "docs" / "configuration.md"

# Filled by the loader from where a table sits or which file was read; never written in a config.
FILLED_BY_LOADER = {"ModelEntry.name", "LyraConfig.source"}

# A sentence for each setting that has no `description=`: said before the setting's comment in schema.py, if it has
# one. Needed where there is no comment, or where the comment gives only a default or a detail.
DESCRIPTIONS: dict[str, str] = {
    "RuntimeSettings.run_dir": "The stack's run directory (mode 0700): its sockets, logs, stack secret, the record "
    "`stack.json` and supervisord's control files; one stack per run directory.",
    "RuntimeSettings.client_endpoint": "Where clients (`lyra`, the Python client, the gateway) connect; a `tcp://` "
    "endpoint must be loopback unless `allow_remote` is true.",
    "RuntimeSettings.worker_endpoint": "Where workers connect, under the same rules as `client_endpoint`; a tcp "
    "endpoint beyond loopback raises `heartbeat_timeout_s`'s default to 10 s.",
    "RuntimeSettings.allow_remote": "Allow tcp endpoints beyond loopback (they then need `curve = true`).",
    "RuntimeSettings.secret_file": "The stack secret's file.",
    "RuntimeSettings.queue_size": "Requests that may wait in the coordinator's queue; one more is answered `busy` "
    "with the queue depth.",
    "RuntimeSettings.max_message_mb": "Largest frame any socket accepts; a larger one is answered `too_large`.",
    "RuntimeSettings.max_image_mb": "Largest image a request may attach; a larger one is refused with "
    "`image_too_large`.",
    "RuntimeSettings.max_image_side": "Largest image side accepted; a larger one is refused with `image_dimensions`.",
    "RuntimeSettings.max_image_megapixels": "Largest image area accepted, read from the header before any pixel is "
    "decoded; a larger one is refused with `image_dimensions`.",
    "RuntimeSettings.client_max_mb_per_s": "Each client's pace in megabytes per second (a burst of one second's "
    "worth); the excess is answered `busy` before it is decoded.",
    "RuntimeSettings.heartbeat_interval_s": "How often workers send a heartbeat (with their measured memory).",
    "RuntimeSettings.heartbeat_timeout_s": "Silence after which a worker counts as gone; must exceed twice "
    "`heartbeat_interval_s`. A request that needs a missing or restarting worker waits this long for it. The default "
    "is 10 s when the worker endpoint is tcp beyond loopback.",
    "RuntimeSettings.drain_s": "How long the running request may take to finish after SIGTERM.",
    "RuntimeSettings.keys_dir": "Where `lyra keys` writes, and every process reads, the CurveZMQ key files.",
    "Deadlines.route": "Longest the route stage may take.",
    "Deadlines.load": "Longest the load stage (making the specialist resident) may take.",
    "Deadlines.specialist": "Longest the specialist stage may take.",
    "Deadlines.voice": "Longest the voice stage may take.",
    "Scheduling.max_overtakes": "How many times a waiting request may be overtaken by a later one whose specialist is "
    "already resident.",
    "WeightCacheSettings.size_gb": "Host RAM the specialist host may fill with specialist weights.",
    "GpuEntry.index": "The physical GPU's index on its host, as `nvidia-smi` numbers it; `services.<name>.gpus` "
    "refers to it.",
    "GpuEntry.name": "A label for the GPU in `lyra plan` and `lyra status`.",
    "GpuEntry.budget_gb": "Memory the runtime may use on this GPU; the plan and the ledger check every load against "
    "it.",
    "ServicePlacement.gpus": "Physical GPUs (indices of `[[gpus]]`) the process is pinned to through "
    "`CUDA_VISIBLE_DEVICES`; empty = CPU only.",
    "ModelEntry.kind": "What the model does: text (`causal_lm`), pictures (`image_generation`, the artist) or answers "
    "about an attached image (`vision_language`, perception).",
    "ModelEntry.backend": "What runs it: `fake` (a test double), `transformers`, `diffusers` (image generation) or "
    "`openai` (an OpenAI-compatible server, see `remote`).",
    "ModelEntry.path": "Where the weights are.",
    "ModelEntry.dtype": "Weight and compute dtype; `auto` is bfloat16 on a GPU and float32 on the CPU.",
    "ModelEntry.quantization": "Quantize the weights at load; see quantization.md.",
    "ModelEntry.attn_implementation": "transformers' attention for prefill: `auto` picks FlashAttention 2 when "
    "`flash-attn` is installed, else PyTorch SDPA.",
    "ModelEntry.max_context": "Tokens of context: the KV cache the engine allocates and the plan counts; a longer "
    "prompt is cut from the left.",
    "ModelEntry.device_map": "Layer placement over the service's GPUs: a strategy (`auto`, `balanced`, "
    "`balanced_low_0`, `sequential`) or a table of module names (ranges such as `model.layers.0-39`) to GPU indices "
    "relative to the service.",
    "ModelEntry.max_memory": "Memory caps per GPU for a device-map strategy.",
    "ModelEntry.engine": "The decode engine: `auto` (the default: `fused` where it runs on Lyra's kernels, else "
    "`graphs`), `graphs`, `compiled`, `fused` (Lyra's own one-token step for Llama, Mistral and Qwen2 decoders; "
    "other models get `compiled`) or `eager`; see decode-engine.md.",
    "ModelEntry.system_prompt": "The system turn of every prompt this model gets.",
    "GenerationDefaults.max_new_tokens": "Longest reply in tokens, unless the request sets its own.",
    "GenerationDefaults.temperature": "Sampling temperature.",
    "GenerationDefaults.top_p": "Nucleus sampling: sample from the smallest set of tokens whose probabilities add up "
    "to this (1 = off).",
    "GenerationDefaults.seed": "Seed for sampled replies; unset = not seeded.",
    "ImageDefaults.width": "Image width.",
    "ImageDefaults.height": "Image height in pixels when the request sets none.",
    "FakeBehaviour.misbehave": "Misbehave on purpose (tests): hang, crash, send garbage or answer with an error.",
    "FakeBehaviour.misbehave_on": "Which call misbehaves.",
    "RemoteSettings.base_url": "The server's OpenAI API base URL (`http://` or `https://`).",
    "RemoteSettings.connect_timeout_s": "Longest wait to open a connection to the server.",
    "RemoteSettings.max_backoff_s": "Longest wait between two retries.",
    "RouterSettings.prompt_template": "The router's prompt: `{labels}` becomes the routable specialists' names and "
    "descriptions, `{text}` the turn.",
    "RouterSettings.calibrate": "Calibrate label scores against content-free input. On by default; a router with "
    "`backend = \"openai\"` defaults to off.",
    "RouterSettings.fallback": "The specialist for turns whose best score is below `min_confidence`; must be routable.",
    "GatewaySettings.host": "The address the gateway listens on.",
    "GatewaySettings.port": "The port the gateway listens on.",
}

# The unit of a setting whose name does not end in one of SUFFIX_UNITS' suffixes.
UNITS: dict[str, str] = {
    "RuntimeSettings.max_image_side": "pixels",
    "RuntimeSettings.max_image_megapixels": "megapixels",
    "RuntimeSettings.client_max_msgs_per_s": "frames/s",
    "Deadlines.route": "s",
    "Deadlines.load": "s",
    "Deadlines.specialist": "s",
    "Deadlines.voice": "s",
    "GenerationDefaults.max_new_tokens": "tokens",
    "GenerationDefaults.finish_sentence_tokens": "tokens",
    "ImageDefaults.width": "pixels",
    "ImageDefaults.height": "pixels",
    "ImageDefaults.max_side": "pixels",
    "ImageDefaults.max_sequence_length": "tokens",
    "ModelEntry.max_context": "tokens",
    "ModelEntry.parameters_b": "10^9 parameters",
}
# A setting's unit from its name, first match wins: sizes are decimal (shared/config/units.py).
SUFFIX_UNITS = (("_gb", "GB (10^9 bytes)"), ("_mb_per_s", "MB/s (10^6 bytes)"), ("_mb", "MB (10^6 bytes)"), ("_s", "s"))

INTRO = """\
# Configuration

<!-- Generated by scripts/config_docs.py from shared/config/schema.py; edit those, then run the script. -->

One TOML file configures a whole stack: every process reads it (supervisord passes its path), and
`lyra up`, `lyra plan`, `lyra doctor` and `lyra route` take it with `-c`. A bad file fails with one line
naming the file and the field, e.g. `configs/x.toml: specialists.pragmatist.backend: Input should be
'fake', 'transformers', 'diffusers' or 'openai'`. Unknown keys are errors (they are usually typos).

Units: GB is 10^9 bytes and MB 10^6 bytes everywhere (`shared/config/units.py`); `_s` settings are
seconds. Shipped configs: `configs/dev.toml` (fake workers), `configs/default.toml` (the embedded
SmolLM2 default), `configs/a6000x2.toml` and `configs/a6000x2-fp16.toml` (the reference 2 x 48 GB box),
`configs/h100x1.toml` (one 80 GB card).
"""

# Text under a section's heading, beyond its class docstring.
SECTION_NOTES: dict[str, str] = {
    "[services.<service>]": "`<service>` is one of " + ", ".join(f"`{name}`" for name in WORKER_SERVICES) + ".",
    "[router], [specialists.<name>], [voice]": "Every model is one such table; the table's key is its name. The "
    "router never decodes (it scores its labels in one forward pass), so its `engine` is always `eager`. "
    "Sub-tables: `generation`, `image`, `remote`, `fake` (below).",
}


@dataclass(frozen=True)
class Setting:
    """One documented setting: its key, type, default, unit and sentence."""

    key: str
    type: str
    default: str
    unit: str
    text: str


# ---------------------------------------------------------------- reading schema.py's comments


def field_comments(source: str) -> dict[str, str]:
    """`Class.field` -> the comment on the field's line, after the comment block right above it."""
    by_line: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            by_line[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for statement in node.body:
            if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
                continue
            above: list[str] = []
            line = statement.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, by_line.get(line, ""))
                line -= 1
            trailing = [by_line[n] for n in range(statement.lineno, statement.end_lineno + 1) if n in by_line]
            text = " ".join(part for part in [*above, *trailing] if part)
            if text:
                found[f"{node.name}.{statement.target.id}"] = text
    return found


def sentence(text: str) -> str:
    """A comment as a sentence: capitalised, ending in a full stop."""
    text = text.strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def description(cls: type[BaseModel], name: str, comments: dict[str, str]) -> str:
    """The sentence for one setting (see the module docstring for where it comes from)."""
    key = f"{cls.__name__}.{name}"
    info = cls.model_fields[name]
    if info.description:
        return sentence(info.description)
    return " ".join(part for part in (DESCRIPTIONS.get(key, ""), sentence(comments.get(key, ""))) if part)


# ---------------------------------------------------------------- types, defaults, units


def type_name(annotation: Any) -> str:
    """A field's type in TOML words."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f'`"{value}"`' for value in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [type_name(arg) for arg in args if arg is not type(None)]
        optional = " (optional)" if type(None) in args else ""
        return " or ".join(kinds) + optional
    if origin is list:
        return f"array of {plural(args[0])}"
    if origin is dict:
        return f"table of {plural(args[1])}"
    names = {str: "string", bool: "boolean", int: "integer", float: "number"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return str(annotation)


def plural(annotation: Any) -> str:
    """The items of an array or table: "integers", "integers or strings"."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(plural(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return type_name(annotation) + "s"


def bounds(metadata: list[Any]) -> str:
    """A field's bounds from its `Field(ge=..., le=..., max_length=...)`."""
    words = []
    for item in metadata:
        for attribute, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attribute, None) is not None:
                words.append(f"{word} {getattr(item, attribute)}")
        if getattr(item, "max_length", None) is not None:
            words.append(f"at most {item.max_length} items")
    return ", ".join(words)


def toml_value(value: Any) -> str:
    """A default value as it would be written in the TOML file."""
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        shown = value.replace("\n", "\\n")
        return f'`"{shown}"`'
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, (list, dict)):
        return f"`{value}`" if value else ("`[]`" if isinstance(value, list) else "`{}`")
    return f"`{value}`"


def unit(cls: type[BaseModel], name: str) -> str:
    """A setting's unit: from the tables above, else from its name's suffix."""
    key = f"{cls.__name__}.{name}"
    if key in UNITS:
        return UNITS[key]
    for suffix, word in SUFFIX_UNITS:
        if name.endswith(suffix):
            return word
    return ""


# ---------------------------------------------------------------- the page


def sections() -> list[tuple[str, type[BaseModel]]]:
    """Each documented table as it is written in TOML, with its model, in the order the page shows them."""
    found: list[tuple[str, type[BaseModel]]] = []
    models_done = False
    for name, info in schema.LyraConfig.model_fields.items():
        annotation = info.annotation
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        inner = args[-1] if origin in (list, dict) else annotation
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            continue
        if inner is schema.ModelEntry:
            if not models_done:
                found.append(("[router], [specialists.<name>], [voice]", inner))
                found += [(f"[<model>.{sub}]", typing.cast(type[BaseModel], sub_info.annotation))
                          for sub, sub_info in inner.model_fields.items() if is_section(sub_info.annotation)]
                models_done = True
            continue
        if origin is list:
            found.append((f"[[{name}]]", inner))
        elif origin is dict:
            found.append((f"[{name}.<service>]", inner))
        else:
            found.append((f"[{name}]", inner))
    return found


def is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def settings_of(cls: type[BaseModel], comments: dict[str, str]) -> list[Setting]:
    """The documented settings of one table (nested tables get sections of their own)."""
    rows = []
    for name, info in cls.model_fields.items():
        if f"{cls.__name__}.{name}" in FILLED_BY_LOADER or is_section(info.annotation):
            continue
        kind = type_name(info.annotation)
        limits = bounds(info.metadata)
        rows.append(Setting(name, f"{kind}, {limits}" if limits else kind, toml_value(info.default),
                            unit(cls, name), description(cls, name, comments)))
    return rows


def cell(text: str) -> str:
    """Text for a table cell: pipes escaped, and `<` outside code spans, so `<run_dir>` is not read as HTML."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(part if n % 2 else re.sub(r"<(?=[A-Za-z])", "&lt;", part) for n, part in enumerate(parts))


def render() -> str:
    """The whole of docs/configuration.md."""
    comments = field_comments(SCHEMA_FILE.read_text(encoding="utf-8"))
    out = [INTRO]
    for heading, cls in sections():
        out.append(f"## `{heading}`\n")
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        note = SECTION_NOTES.get(heading, "")
        out.append(" ".join(part for part in (doc, note) if part) + "\n")
        out.append("| setting | type | default | unit | what it does |")
        out.append("|---|---|---|---|---|")
        for row in settings_of(cls, comments):
            cells = [f"`{row.key}`", *(cell(text) for text in (row.type, row.default, row.unit, row.text))]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------- checks the tests run


def every_setting() -> list[tuple[type[BaseModel], str]]:
    """Every (model, field) the page documents."""
    found: list[tuple[type[BaseModel], str]] = []
    for _, cls in sections():
        found += [(cls, name) for name, info in cls.model_fields.items()
                  if f"{cls.__name__}.{name}" not in FILLED_BY_LOADER and not is_section(info.annotation)]
    return found


def missing_descriptions() -> list[str]:
    """`Class.field` of every documented setting that has no sentence."""
    comments = field_comments(SCHEMA_FILE.read_text(encoding="utf-8"))
    return [f"{cls.__name__}.{name}" for cls, name in every_setting() if not description(cls, name, comments)]


def stale_entries() -> list[str]:
    """Keys of this script's tables that name no setting (a setting renamed or removed)."""
    known = {f"{cls.__name__}.{name}" for cls, name in every_setting()} | FILLED_BY_LOADER
    return sorted(key for table in (DESCRIPTIONS, UNITS) for key in table if key not in known)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page differs from what this writes")
    parser.add_argument("--out", type=Path, default=DOC_FILE, help="the page to write or check")
    args = parser.parse_args(argv)
    problems = [f"{key}: no description" for key in missing_descriptions()]
    problems += [f"{key}: in scripts/config_docs.py's tables but not a setting" for key in stale_entries()]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    page = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current == page:
            return 0
        diff = difflib.unified_diff(current.splitlines(), page.splitlines(), str(args.out), "generated", lineterm="")
        print("\n".join(list(diff)[:60]), file=sys.stderr)
        print(f"{args.out} is out of date: run python scripts/config_docs.py", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
