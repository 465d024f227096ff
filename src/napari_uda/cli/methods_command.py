"""``napari-uda methods``: every adaptation method, its settings (defaults, help) and needs."""

from __future__ import annotations

import argparse
import json
import typing

from ..settings import SettingSpec, describe


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "methods",
        help="list the adaptation methods, their settings and what they need",
        description="List the adaptation methods with their settings (defaults and help) and "
        "what each needs from a model. With --model, say which methods can adapt it.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--model", help="a model bundle: show which methods apply to it")
    parser.set_defaults(run=run)


def type_name(hint) -> str:
    """A short readable name of a settings field's type (``int``, ``mse | ce | dice``...)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " | ".join(str(v) for v in typing.get_args(hint))
    if origin is not None and typing.get_args(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " | ".join(type_name(a) for a in args) + (
            " | None" if type(None) in typing.get_args(hint) else ""
        )
    return getattr(hint, "__name__", str(hint))


def spec_record(spec: SettingSpec) -> dict:
    default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
    record = {"name": spec.name, "type": type_name(spec.type), "default": default}
    record["help"] = spec.help
    for key in ("min", "max", "choices"):
        value = getattr(spec, key)
        if value is not None:
            record[key] = list(value) if isinstance(value, tuple) else value
    return record


def method_records(capabilities: set[str] | None = None) -> list[dict]:
    """One JSON-able record per registered method, sorted by name."""
    from ..adaptation.base import CAPABILITY_NAMES, available_methods

    records = []
    for name, method in sorted(available_methods().items()):
        record = {
            "name": name,
            "title": method.title,
            "summary": method.summary,
            "reference": method.reference,
            "requires": sorted(method.requires),
            "requires_any": sorted(method.requires_any),
            "needs": [CAPABILITY_NAMES.get(c, c) for c in sorted(method.requires)],
            "uses_source_data": method.uses_source_data,
            "settings": [spec_record(spec) for spec in describe(method.Settings)],
        }
        if method.requires_any:
            record["needs"].append(
                " or ".join(CAPABILITY_NAMES.get(c, c) for c in sorted(method.requires_any))
            )
        if capabilities is not None:
            record["unmet"] = method.unmet_needs(capabilities)
            record["applies"] = not record["unmet"]
        records.append(record)
    return records


def format_default(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "(none)"
    return "(none)" if value is None else str(value)


def run(args: argparse.Namespace) -> int:
    capabilities = None
    if args.model:
        from ..core.models import load_model

        capabilities = load_model(args.model).capabilities
    records = method_records(capabilities)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for record in records:
        print(f"{record['name']}: {record['title']}")
        print(f"  {record['summary']}")
        if record["reference"]:
            print(f"  Reference: {record['reference']}")
        needs = "; ".join(record["needs"]) or "nothing beyond a model"
        print(f"  Needs: {needs}")
        if "applies" in record:
            verdict = "yes" if record["applies"] else "no: " + "; ".join(record["unmet"])
            print(f"  Applies to {args.model}: {verdict}")
        print("  Settings (--set key=value):")
        for spec in record["settings"]:
            bounds = ""
            if "choices" in spec:
                bounds = f" [choices: {', '.join(map(str, spec['choices']))}]"
            elif "min" in spec or "max" in spec:
                bounds = f" [{spec.get('min', '')}..{spec.get('max', '')}]"
            print(
                f"    {spec['name']} ({spec['type']}, default {format_default(spec['default'])})"
                f"{bounds}: {spec['help']}"
            )
        print()
    return 0
