"""From ``--data NAME=PATH`` values to evaluation/training sources."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from ..data.registry import DataFormat, describe, load_descriptions, parse_data_arg
from ..data.scanners import load_data
from ..errors import MoECLIPError
from .evaluate import EvalSource


def build_source(value: str, *, descriptions: Optional[str] = None, fix_typos: bool = False,
                 domain: Optional[str] = None, strict: bool = False, report=print) -> EvalSource:
    """Scan one ``--data`` value; prompts use the dataset's official table unless overridden."""
    source, path = parse_data_arg(value)
    spec = source.dataset if isinstance(source, DataFormat) else source
    result = load_data((source, path), strict=strict)
    if result.problems:
        report(f"warning: {len(result.problems)} problem(s) in {value}:")
        for p in result.problems[:10]:
            report(f"  {p}")
        if len(result.problems) > 10:
            report(f"  ... and {len(result.problems) - 10} more (moeclip datasets scan lists them all)")
    if not result.samples:
        raise MoECLIPError(f"--data {value}: no images found")
    overrides: Dict[str, str] = load_descriptions(descriptions) if descriptions else {}
    if not overrides and result.root is not None and (result.root / "descriptions.json").is_file():
        overrides = load_descriptions(result.root / "descriptions.json")  # e.g. moeclip datasets synth
    name = spec.display_name if spec else (Path(path).name or str(path))
    dom = domain or (spec.domain if spec else "industrial")
    order = list(spec.class_names) if spec else []
    return EvalSource(name=name, domain=dom, samples=result.samples,
                      describe=lambda c: describe(spec, c, fix_typos=fix_typos, overrides=overrides),
                      class_order=order)


def build_sources(values: List[str], **kwargs) -> List[EvalSource]:
    if not values:
        raise MoECLIPError("at least one --data NAME=PATH is required")
    return [build_source(v, **kwargs) for v in values]
