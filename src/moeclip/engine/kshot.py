"""The k-shot protocol: per class, K normal training images drawn per seed as references.

For every seed and every class, K references are drawn (``numpy.random.default_rng(seed)``,
without replacement, from the sorted list of the class's normal training images, see
:mod:`moeclip.data.references`), a memory bank is built from them, and the class's test images
are evaluated on the fused map (:class:`moeclip.engine.evaluate.FewShot`). Results are reported
per seed and as mean and sample standard deviation (ddof=1) over the seeds. A reference is never a
test image: the draw is refused if one is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..data.references import draw_shots, folder_references, training_normals
from ..data.sample import Sample
from ..errors import MoECLIPError
from .evaluate import EvalResult, EvalSource, FewShot, evaluate_source, seed_statistics


@dataclass
class KShotResult:
    source: str
    domain: str
    seeds: List[int]
    per_seed: List[EvalResult]
    stats: Dict[str, Dict] = field(default_factory=dict)


def parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise MoECLIPError(f"--shot-seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise MoECLIPError(f"--shot-seeds: expected distinct seeds, got {text!r}")
    return seeds


def match_reference_data(values: Sequence[str], sources: Sequence[EvalSource],
                         data_values: Sequence[str]) -> Dict[int, str]:
    """``--reference-data NAME=PATH`` -> {source index: PATH}; NAME is the ``--data`` NAME or the source's name."""
    out: Dict[int, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise MoECLIPError(f"--reference-data {value!r}: expected NAME=PATH")
        key = name.strip().lower()
        hits = [i for i, (src, dv) in enumerate(zip(sources, data_values))
                if key in (src.name.lower(), dv.partition("=")[0].strip().lower())]
        if not hits:
            names = ", ".join(s.name for s in sources)
            raise MoECLIPError(f"--reference-data {value!r}: no --data named {name.strip()!r} (have: {names})")
        for i in hits:
            out[i] = path.strip()
    return out


def reference_picker(shots: Optional[int], seed: int, user_path: Optional[str] = None,
                     single_class: bool = False) -> Callable[[EvalSource, str, List[Sample]], List[Path]]:
    """The ``FewShot.references`` callable of one seed: K draws from the training normals or ``user_path``."""
    def pick(source: EvalSource, group: str, samples: List[Sample]) -> List[Path]:
        what = f"{source.name}/{group}"
        if user_path is not None:
            pool = folder_references(user_path, samples[0].class_name, single_class)
        else:
            pool = training_normals(samples, source.name, group)
        chosen = draw_shots(pool, shots, seed, what)
        test = {str(Path(s.image_path).resolve()) for s in samples}
        leaked = [p for p in chosen if str(Path(p).resolve()) in test]
        if leaked:
            raise MoECLIPError(f"{what}: reference {leaked[0]} is also a test image (references must not be)")
        return chosen
    return pick


def evaluate_k_shot(model, source: EvalSource, *, shots: Optional[int], seeds: Sequence[int],
                    user_path: Optional[str] = None, weight: float = 0.5, bank_size: Optional[int] = None,
                    bank_fp16: bool = False, on_batch_for: Optional[Callable[[int], Optional[Callable]]] = None,
                    keep_maps_first: bool = False, **eval_kwargs) -> KShotResult:
    """One source under the k-shot protocol: an :class:`EvalResult` per seed plus mean/std over seeds."""
    single = len(source.groups()) == 1
    per_seed = []
    for n, seed in enumerate(seeds):
        plan = FewShot(reference_picker(shots, seed, user_path, single), weight, bank_size, bank_fp16)
        per_seed.append(evaluate_source(model, source, few_shot=plan,
                                        on_batch=on_batch_for(seed) if on_batch_for else None,
                                        keep_maps=keep_maps_first and n == 0, **eval_kwargs))
    return KShotResult(source.name, per_seed[0].domain, list(seeds), per_seed, seed_statistics(per_seed))
