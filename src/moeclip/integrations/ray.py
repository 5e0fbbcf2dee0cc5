"""Batch inference on a Ray cluster with Ray Data: ``moeclip predict --ray`` and :func:`score_dataset`.

The stages are those of :mod:`moeclip.inference.pipeline`, spread over a cluster::

    driver      list the inputs (local files/folders/globs: expand_inputs; s3://, gs://, file://, ...:
                pyarrow.fs), assign objects (ObjectRules), drop what results.jsonl already holds (--resume)
    Ray tasks   decode (pipeline.decode; remote files read through pyarrow.fs)         map_batches, CPU
    Ray actors  one model each, built from the picklable RuntimeSpec: score_images, result_record
    files       the bytes of the map, overlay and mask (post.unit_map, render.overlay, post.mask): in CPU
                tasks after GPU actors, so a GPU never waits for PNG encoding; inside CPU actors (which
                would otherwise hold every CPU those tasks need; decoding is fused there too by Ray)
    driver      results in input order, each image once: ResultWriter names the files (the names of
                ``predict``), writes them and the line; then results.parquet from results.jsonl

Only the driver writes to ``--out``, so no shared filesystem is needed for the outputs; the inputs
and the model files must be readable from every node (the same local path, a shared filesystem, or
a URI such as ``s3://``). Exactly once: Ray restarts a dead actor and re-runs its batch (Ray Data's
actor defaults, ``max_restarts=-1, max_task_retries=-1``; tasks ``max_retries=-1``), and the driver
keeps the first result of each key; a killed driver leaves complete lines, and ``--resume`` scores
what is missing. Ray itself is imported lazily: ``moeclip`` works without it.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import signal
import sys
import tempfile
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import MoECLIPError
from ..inference.build import RuntimeSpec
from ..inference.pipeline import (
    IMAGE_EXTENSIONS,
    RESULTS_FILE,
    Job,
    ObjectRules,
    ResultWriter,
    Summary,
    batches,
    decode,
    expand_inputs,
    result_record,
    score_images,
)

__all__ = ["add_ray_args", "connect", "list_inputs", "score_dataset", "predict", "predict_from_args",
           "RESULT_FIELDS", "PARQUET_FILE", "RuntimeSpec"]

PARQUET_FILE = "results.parquet"
#: The columns of :func:`score_dataset` (``anomaly_map`` is added with ``maps=True``).
RESULT_FIELDS = ("key", "path", "object", "object_source", "domain", "score", "raw_score", "map_max", "width",
                 "height", "decision", "threshold", "error")
#: Test hook: ``N:MARKER`` makes one scoring actor kill itself (SIGKILL) after N batches, once (MARKER file).
CRASH_ENV = "MOECLIP_RAY_TEST_CRASH"
NON_FINITE = "the model returned non-finite values (try --precision fp32)"
_ADDRESS = re.compile(r"^(local|auto|ray://\S+|[\w.\-]+:\d+)$")
_URI = re.compile(r"^[A-Za-z][\w+.\-]*://")


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is what the [ray] extra adds
    except ImportError as exc:
        raise MoECLIPError("--ray needs Ray Data, which is not installed: pip install 'moeclip[ray]'") from exc
    return ray


# ---------------------------------------------------------------------------- CLI flags
def ray_address(value: str) -> str:
    """argparse type of ``--ray [ADDRESS]`` (predict and serve)."""
    if not _ADDRESS.match(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a Ray address (local, auto, HOST:PORT or ray://HOST:PORT); "
            "give --ray a value (--ray local) when a file or folder follows it")
    return value


def add_ray_args(parser) -> None:
    """``--ray [ADDRESS]``, ``--ray-actors``, ``--ray-gpus-per-actor`` (for ``moeclip predict``)."""
    g = parser.add_argument_group("Ray (batch inference on a cluster; pip install 'moeclip[ray]')")
    g.add_argument("--ray", nargs="?", const="local", default=None, type=ray_address, metavar="ADDRESS",
                   help="run on Ray Data: 'local' (default) starts Ray on this machine, 'auto' joins the cluster "
                        "of 'ray start', or HOST:PORT / ray://HOST:PORT; also writes results.parquet")
    g.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="scoring actors, one model each (default: one per GPU with --ray-gpus-per-actor, else 1)")
    g.add_argument("--ray-gpus-per-actor", type=float, default=None, metavar="G",
                   help="GPUs per actor, fractions allowed (default: 1 if the cluster has GPUs, else 0)")


# ---------------------------------------------------------------------------- cluster
def connect(address: Optional[str] = "local", **init_kwargs) -> bool:
    """Join (``auto``, ``HOST:PORT``, ``ray://...``) or start (``local``) a Ray cluster.

    Returns whether this call connected (then :func:`predict` also disconnects); a process
    already connected keeps its connection, whatever ``address`` says.
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "logging_level": "WARNING", **init_kwargs}
    address = address or "local"
    if address != "local":
        match_auth_mode(address)
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        hint = " (start one with 'ray start --head', or use --ray local)" if address == "auto" else ""
        raise MoECLIPError(f"--ray {address}: no Ray cluster to join{hint}: {exc}") from exc
    except Exception as exc:  # ray.exceptions.AuthenticationError, or RuntimeError "no authentication token"
        if "token" not in str(exc).lower():
            raise
        raise MoECLIPError(f"--ray {address}: the cluster requires Ray's authentication token and this machine "
                           f"has none (or another one): copy the head node's token ('ray get-auth-token' there) "
                           f"to {Path.home() / '.ray' / 'auth_token'}, or set RAY_AUTH_TOKEN") from None
    return True


AUTH_MODE_ENV = "RAY_AUTH_MODE"

_PROBE = """
import os, sys
os.environ["RAY_AUTH_MODE"] = "disabled"
from ray._private.services import canonicalize_bootstrap_address_or_die
from ray._raylet import GcsClient
address = canonicalize_bootstrap_address_or_die(sys.argv[1])
GcsClient(address=address).internal_kv_keys(b"session_name", None, timeout=15)
"""


def _token_available() -> bool:
    """Ray (>= 2.59) would find a token and send it: RAY_AUTH_TOKEN(_PATH) or ~/.ray/auth_token."""
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


def cluster_without_auth(address: str) -> bool:
    """Whether the cluster at ``address`` answers a client that sends no token (a subprocess, ~1 s)."""
    import subprocess

    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def match_auth_mode(address: str) -> Optional[str]:
    """Join a cluster in its own authentication mode; returns the mode set, if any.

    From Ray 2.59, a driver that finds a token (``~/.ray/auth_token``, made by any local
    ``ray.init()``, e.g. ``predict --ray local``) sends it and expects it back, while a cluster that
    ``ray start --head`` started before that token existed runs without authentication: its
    workers then call the driver without a token and fail with ``InvalidAuthToken``, and the run
    hangs. So, unless ``RAY_AUTH_MODE`` is set, a token is present and the cluster answers without
    one, this process joins with ``RAY_AUTH_MODE=disabled``. ``ray://`` addresses (Ray Client) are
    left to Ray.
    """
    if AUTH_MODE_ENV in os.environ or address.startswith("ray://") or not _token_available():
        return None
    if not cluster_without_auth(address):
        return None
    os.environ[AUTH_MODE_ENV] = "disabled"
    print(f"note: the Ray cluster at {address} runs without token authentication although this machine has "
          f"a Ray token: joining with {AUTH_MODE_ENV}=disabled (set {AUTH_MODE_ENV} to choose)", file=sys.stderr)
    return "disabled"


def _plan_actors(actors: Optional[int], gpus_per_actor: Optional[float]) -> Tuple[int, float]:
    ray = _ray()
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    gpus = (1.0 if cluster_gpus else 0.0) if gpus_per_actor is None else float(gpus_per_actor)
    if gpus < 0:
        raise MoECLIPError("--ray-gpus-per-actor must not be negative")
    if actors is None:
        actors = max(1, int(cluster_gpus // gpus)) if gpus > 0 else 1
    if actors < 1:
        raise MoECLIPError("--ray-actors must be at least 1")
    if gpus > 0 and actors * gpus > cluster_gpus:
        raise MoECLIPError(f"{actors} actor(s) x {gpus:g} GPU need {actors * gpus:g} GPUs; the cluster has "
                           f"{cluster_gpus:g}")
    return actors, gpus


# ---------------------------------------------------------------------------- inputs
def is_uri(spec: str) -> bool:
    """``s3://bucket/x``, ``gs://...``, ``file:///...``: read through pyarrow.fs, not the local file API."""
    return bool(_URI.match(str(spec)))


def _split_uri(uri: str) -> Tuple[Any, str, str]:
    """(pyarrow filesystem, path in it, the URI prefix that turns such a path back into a URI)."""
    from pyarrow import fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    prefix = uri[: len(uri) - len(path)] if uri.endswith(path) else uri.split("://", 1)[0] + "://"
    return fs, path, prefix


def _list_remote(spec: str) -> List[Tuple[str, str, str]]:
    """(uri, root, path) of the image files a URI names: a file, a folder (recursive) or a glob."""
    from pyarrow import fs as pafs

    magic = glob.has_magic(spec.split("://", 1)[1])
    first_magic = min((i for i, c in enumerate(spec) if c in "*?["), default=len(spec))
    base = spec[:spec.rfind("/", 0, first_magic)] if magic else spec
    try:
        fs, path, prefix = _split_uri(base)
        info = fs.get_file_info(path)
    except (OSError, ValueError) as exc:
        raise MoECLIPError(f"{spec}: cannot list ({exc})") from exc
    if info.type == pafs.FileType.File and not magic:
        return [(spec, str(PurePosixPath(path).parent), path)]
    if info.type != pafs.FileType.Directory:
        if magic:
            print(f"warning: {spec!r} matches no image file", file=sys.stderr)
            return []
        return [(spec, str(PurePosixPath(path).parent), path)]  # named but missing: an error line later
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = []
    for f in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        rel = PurePosixPath(f.path).relative_to(path).parts
        if any(p.startswith(".") for p in rel) or PurePosixPath(f.path).suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        uri = prefix + f.path
        # as glob: '*' stays within a folder, '**' crosses folders
        if not magic or (("**" in spec and (fnmatch(uri, spec) or fnmatch(uri, spec.replace("**/", ""))))
                         or (fnmatch(uri, spec) and uri.count("/") == spec.count("/"))):
            out.append((uri, path, f.path))
    if magic and not out:
        print(f"warning: {spec!r} matches no image file", file=sys.stderr)
    return out


def list_inputs(specs: Sequence[str], rules: Optional[ObjectRules] = None, exclude: Optional[Path] = None) -> List[Job]:
    """Local files/folders/globs (as ``predict``) and URIs -> jobs in order, each key once, objects assigned."""
    jobs: List[Job] = []
    seen = set()
    for spec in specs:
        if is_uri(spec):
            found = []
            for uri, root, path in _list_remote(spec):
                job = Job(key=uri)
                if rules is not None:
                    job.object, job.source = rules.resolve(PurePosixPath(path), PurePosixPath(root))
                found.append(job)
        else:
            found = expand_inputs([spec], exclude=exclude)
            if rules is not None:
                rules.assign(found)
        for job in found:
            if job.key not in seen:
                seen.add(job.key)
                jobs.append(job)
    return jobs


# ---------------------------------------------------------------------------- decoding (Ray tasks)
def _decode_remote(uri: str, max_pixels: Optional[int]):
    """A URI's bytes through pyarrow.fs, decoded by the pipeline (a temporary file: same checks, same errors)."""
    try:
        fs, path, _ = _split_uri(uri)
        with fs.open_input_stream(path) as fh:
            data = fh.read()
    except (OSError, ValueError) as exc:
        raise MoECLIPError(f"cannot read image file {uri}: {exc}") from exc
    fd, tmp = tempfile.mkstemp(suffix=PurePosixPath(path).suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            return decode(tmp, max_pixels)
        except MoECLIPError as exc:
            raise MoECLIPError(str(exc).replace(tmp, uri)) from None
    finally:
        os.unlink(tmp)


def _decode_batch(batch: Dict[str, np.ndarray], max_pixels: Optional[int]) -> Dict[str, Any]:
    images, errors = [], []
    for path, remote in zip(batch["file"], batch["remote"]):
        try:
            img = _decode_remote(str(path), max_pixels) if remote else decode(str(path), max_pixels)
            images.append(np.asarray(img, dtype=np.uint8))
            errors.append("")
        except MoECLIPError as exc:
            images.append(np.zeros((0, 0, 3), np.uint8))
            errors.append(str(exc))
    return {**batch, "image": images, "error": np.asarray(errors, dtype=object)}


# ---------------------------------------------------------------------------- scoring (Ray actors)
class _Scorer:
    """One model per actor: decoded images -> records (JSON) and, for rendering, maps and images.

    ``outputs``: ``"record"`` only, ``"map"`` (+ ``anomaly_map`` at the image's size), ``"render"``
    (+ ``anomaly_map`` and ``image``, for :func:`_render_batch` in CPU tasks, so that a GPU actor spends
    its time on the model, not on PNG encoding) or ``"files"`` (:func:`_render_batch` here: CPU actors,
    which would otherwise hold the CPUs those tasks need).
    """

    def __init__(self, spec: RuntimeSpec, outputs: str = "record", crash: Optional[str] = None,
                 maps: bool = True, overlays: bool = True):
        self.built = spec.build()
        self.outputs, self.maps, self.overlays = outputs, maps, overlays
        self.crash, self.calls = crash, 0

    def _maybe_crash(self) -> None:
        """The test hook of :data:`CRASH_ENV`: a real process death, as the OOM killer would cause."""
        if not self.crash:
            return
        after, marker = self.crash.split(":", 1)
        self.calls += 1
        if self.calls > int(after) and not os.path.exists(marker):
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        from PIL import Image

        self._maybe_crash()
        post = self.built.post
        jobs = [Job(path=None if remote else Path(str(p)), key=str(k), object=str(o), source=str(s))
                for k, p, remote, o, s in zip(batch["key"], batch["path"], batch["remote"], batch["object"],
                                               batch["source"])]
        index = {id(j): i for i, j in enumerate(jobs)}
        out: List[Dict[str, Any]] = [{"error": str(e)} if str(e) else {} for e in batch["error"]]
        for group in batches(jobs, len(jobs)):  # consecutive rows of one object: one text encoding
            ok = [j for j in group if not out[index[id(j)]]]
            images = [Image.fromarray(np.asarray(batch["image"][index[id(j)]]), mode="RGB") for j in ok]
            for job, image, scored in zip(ok, images, score_images(self.built.runtime, post, images, group[0].object)):
                i = index[id(job)]
                if not (np.isfinite(scored.raw_score) and np.isfinite(scored.map_max)):
                    out[i] = {"error": NON_FINITE}
                    continue
                out[i] = {"record": result_record(job, scored, image, post),
                          "map": np.asarray(scored.anomaly_map, np.float32), "image": batch["image"][i]}
        cols = self._columns(jobs, out)
        return _render_batch(cols, self.built.post, self.maps, self.overlays) if self.outputs == "files" else cols

    def _columns(self, jobs: List[Job], out: List[Dict[str, Any]]) -> Dict[str, Any]:
        cols: Dict[str, Any] = {"key": np.asarray([j.key for j in jobs], dtype=object)}
        records = [{"path": j.label, "object": j.object, "object_source": j.source, "error": r["error"]}
                   if "error" in r else r["record"] for j, r in zip(jobs, out)]
        cols["record"] = np.asarray([json.dumps(r, ensure_ascii=False) for r in records], dtype=object)
        if self.outputs != "record":
            cols["anomaly_map"] = [r.get("map", np.zeros((0, 0), np.float32)) for r in out]
        if self.outputs in ("render", "files"):
            cols["image"] = [r.get("image", np.zeros((0, 0, 3), np.uint8)) for r in out]
        return cols


# ---------------------------------------------------------------------------- files (Ray tasks)
def _npy_bytes(amap) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(amap, dtype=np.float32))
    return buf.getvalue()


def _render_batch(batch: Dict[str, Any], post, maps: bool, overlays: bool) -> Dict[str, Any]:
    """The bytes of each result's files, as ResultWriter.write renders them (map, overlay, mask)."""
    from PIL import Image

    from ..inference.render import mask_image, overlay, png_bytes

    cols: Dict[str, list] = {"npy": [], "overlay": [], "mask": []}
    for amap, image in zip(batch["anomaly_map"], batch["image"]):
        files = {"npy": b"", "overlay": b"", "mask": b""}
        if amap.size:
            files["npy"] = _npy_bytes(amap) if maps else b""
            if overlays:
                files["overlay"] = png_bytes(overlay(Image.fromarray(np.asarray(image), mode="RGB"),
                                                     post.unit_map(amap)))
            mask = post.mask(amap)
            files["mask"] = png_bytes(mask_image(mask)) if mask is not None else b""
        for c in cols:
            cols[c].append(files[c])
    return {"key": batch["key"], "record": batch["record"],
            **{c: np.asarray(v, dtype=object) for c, v in cols.items()}}


# ---------------------------------------------------------------------------- the dataset
def _rows(jobs: Sequence[Job]) -> List[Dict[str, Any]]:
    """``path`` as the results say it; ``file`` what a worker opens (absolute: workers have their own cwd)."""
    return [{"key": j.key, "path": j.label, "file": j.key if j.path is None else os.path.abspath(j.path),
             "remote": j.path is None, "object": j.object, "source": j.source} for j in jobs]


def _absolute(spec: RuntimeSpec) -> RuntimeSpec:
    """The spec with its local files as absolute paths (actors do not run in the driver's folder)."""
    changes = {f: os.path.abspath(getattr(spec, f)) for f in ("checkpoint", "deploy", "onnx")
               if getattr(spec, f) and not is_uri(getattr(spec, f)) and os.path.exists(getattr(spec, f))}
    return _replace(spec, **changes) if changes else spec


def _jobs_dataset(inputs, rules: Optional[ObjectRules]):
    """Jobs, paths/URIs/globs, or a Ray Dataset with a ``path`` column (and an optional ``object``)."""
    ray = _ray()
    if isinstance(inputs, ray.data.Dataset):
        default = rules.default if rules is not None and rules.default else "object"
        source = rules.default_source if rules is not None and rules.default else "generic"

        def normalise(batch):
            paths = [str(p) for p in batch["path"]]
            objects = [str(o) for o in batch["object"]] if "object" in batch else [default] * len(paths)
            sources = ["column" if "object" in batch else source] * len(paths)
            keys = [p if is_uri(p) else os.path.abspath(p) for p in paths]
            return {"key": np.asarray(keys, dtype=object), "path": np.asarray(paths, dtype=object),
                    "file": np.asarray([p if is_uri(p) else os.path.abspath(p) for p in paths], dtype=object),
                    "remote": np.asarray([is_uri(p) for p in paths]), "object": np.asarray(objects, dtype=object),
                    "source": np.asarray(sources, dtype=object)}

        return inputs.map_batches(normalise, batch_format="numpy")
    jobs = list(inputs) if inputs and isinstance(next(iter(inputs)), Job) else list_inputs(list(inputs), rules)
    if not jobs:
        raise MoECLIPError("no input images found")
    return ray.data.from_items(_rows(jobs))


def _scored_dataset(ds, spec: RuntimeSpec, batch_size: int, actors: int, gpus: float,
                    max_pixels: Optional[int], **scorer):
    ray = _ray()
    if batch_size < 1:
        raise MoECLIPError("--batch-size must be at least 1")
    spec = _absolute(spec)
    if gpus == 0 and spec.device == "auto":
        spec = _replace(spec, device="cpu")  # never a GPU Ray did not give the actor
    ds = ds.map_batches(_decode_batch, batch_size=batch_size, fn_kwargs={"max_pixels": max_pixels},
                        batch_format="numpy")
    ds = ds.map_batches(_Scorer, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus or None,
                        fn_constructor_kwargs={"spec": spec, **scorer})
    ds.context.execution_options.preserve_order = True  # results in input order: the names of `predict`
    return ds


def _replace(spec: RuntimeSpec, **changes) -> RuntimeSpec:
    import dataclasses

    return dataclasses.replace(spec, **changes)


def _flatten(batch: Dict[str, np.ndarray]):
    import pyarrow as pa

    recs = [json.loads(r) for r in batch["record"]]
    table = {f: [r.get(f) for r in recs] for f in RESULT_FIELDS}
    table["key"] = [str(k) for k in batch["key"]]
    types = {"score": pa.float64(), "raw_score": pa.float64(), "map_max": pa.float64(), "width": pa.int64(),
             "height": pa.int64(), "decision": pa.bool_(), "threshold": pa.float64()}
    arrays = {f: pa.array(v, type=types.get(f, pa.string())) for f, v in table.items()}
    if "anomaly_map" in batch:
        from ray.data.extensions import ArrowVariableShapedTensorArray

        arrays["anomaly_map"] = ArrowVariableShapedTensorArray.from_numpy(list(batch["anomaly_map"]))
    return pa.table(arrays)


def score_dataset(inputs, spec: RuntimeSpec, *, object: Optional[str] = None,
                  rules: Optional[ObjectRules] = None, batch_size: int = 8, actors: Optional[int] = None,
                  gpus_per_actor: Optional[float] = None, max_pixels: Optional[int] = None, maps: bool = False):
    """A lazy Ray Dataset of results (columns :data:`RESULT_FIELDS`, ``anomaly_map`` with ``maps=True``).

    ``inputs``: paths, folders, globs and URIs (``s3://bucket/images/``), :class:`Job` objects, or a
    Ray Dataset with a ``path`` column (and optionally ``object``). Objects: ``object`` for every
    image, or ``rules`` (an :class:`ObjectRules`). Unreadable images are rows with ``error``.
    Connect first (:func:`connect`, or ``ray.init``); nothing runs until the dataset is consumed
    (``ds.write_parquet("s3://...")``, ``ds.iter_rows()``, further ``map_batches``, ...).
    """
    from ..data.imageio import DEFAULT_MAX_PIXELS

    _ray()
    if rules is None and object is not None:
        rules = ObjectRules(object)
    elif rules is None and spec.deploy:  # as predict: the deployment's object by default
        from ..inference.deploy import Deployment

        rules = ObjectRules(Deployment.load(spec.deploy).object, default_source="deploy")
    n, gpus = _plan_actors(actors, gpus_per_actor)
    ds = _scored_dataset(_jobs_dataset(inputs, rules), spec, batch_size, n, gpus,
                         DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
                         outputs="map" if maps else "record")
    return ds.map_batches(_flatten, batch_format="numpy", batch_size=None)


# ---------------------------------------------------------------------------- predict --ray
class _Writer(ResultWriter):
    """The pipeline's writer (names, resume, error lines), fed files an actor already rendered."""

    def is_done(self, job) -> bool:
        # a URI's key is the URI; results.jsonl keys are read back through os.path.abspath
        return super().is_done(job) or (isinstance(job, Job) and job.path is None
                                         and os.path.abspath(job.key) in self.done)

    def _put(self, folder: str, name: str, data: bytes) -> str:
        from ..fileio import atomic_write_bytes

        atomic_write_bytes(self.out / folder / name, data)
        return f"{folder}/{name}"

    def write_rendered(self, job: Job, record: Dict[str, Any], files: Dict[str, bytes]) -> Dict[str, Any]:
        """As :meth:`ResultWriter.write`: files first, then the line, with the same fields in the same order."""
        self._start()
        name = self.unique_name(job.path if job.path is not None else PurePosixPath(job.key))
        rest = {k: v for k, v in record.items() if k != "path"}
        rec = {"path": record["path"], "name": name, **rest}
        if self.maps:
            rec["map"] = self._put("maps", f"{name}.npy", files["npy"])
        if self.overlays:
            rec["overlay"] = self._put("overlays", f"{name}.png", files["overlay"])
        if self.masks and files["mask"]:
            rec["mask"] = self._put("masks", f"{name}.png", files["mask"])
            rec["pixel_threshold"] = self.pixel_threshold
        self._emit(rec)
        return rec


def _write_parquet(out: Path) -> Path:
    """results.parquet: every line of results.jsonl (those of earlier --resume runs included)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..fileio import atomic_write

    lines = (out / RESULTS_FILE).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    columns: Dict[str, None] = {}
    for rec in records:  # every field of any line (an error line has few), in first-seen order
        columns.update(dict.fromkeys(rec))
    table = pa.table({c: [rec.get(c) for rec in records] for c in columns})
    target = out / PARQUET_FILE
    atomic_write(target, lambda tmp: pq.write_table(table, tmp))
    return target


def _drain(ds, pending: Dict[str, Job], writer: _Writer, summary: Summary, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(pending), unit="img", desc="predict (ray)", file=sys.stderr, dynamic_ncols=True,
               disable=not progress or not sys.stderr.isatty())
    ds.context.enable_progress_bars = False  # ours counts written lines
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, key in enumerate(batch["key"]):
                job = pending.pop(str(key), None)
                if job is None:  # a result seen twice (a retried batch): the first one counts
                    continue
                rec = json.loads(batch["record"][i])
                if "error" in rec:
                    writer.write_error(job, rec["error"])
                    summary.errors += 1
                else:
                    files = {c: bytes(batch[c][i]) for c in ("npy", "overlay", "mask")}
                    writer.write_rendered(job, rec, files)
                    summary.scored += 1
                    summary.flagged += bool(rec.get("decision"))
                bar.update(1)
    finally:
        bar.close()
    if pending:
        raise MoECLIPError(f"Ray returned no result for {len(pending)} image(s), e.g. {next(iter(pending))}; "
                           "run again with --resume")


def predict(inputs: Sequence[str], spec: RuntimeSpec, out: Union[str, Path], *, objects: Sequence[str] = (),
            class_map: Optional[str] = None, address: Optional[str] = "local", actors: Optional[int] = None,
            gpus_per_actor: Optional[float] = None, batch_size: int = 8, max_pixels: Optional[int] = None,
            maps: bool = True, overlays: bool = True, overwrite: bool = False, resume: bool = False,
            progress: bool = True, render_in_tasks: Optional[bool] = None) -> Tuple[Summary, Optional[float], Path]:
    """``moeclip predict --ray``: the outputs of ``predict`` plus results.parquet.

    ``render_in_tasks``: map/overlay/mask files rendered in CPU tasks after the actors (default:
    with GPU actors) rather than in the actors. Returns (summary, the decision threshold or None,
    the results.jsonl path).
    """
    from ..data.imageio import DEFAULT_MAX_PIXELS

    _ray()
    if overwrite and resume:
        raise MoECLIPError("--overwrite and --resume exclude each other")
    if batch_size < 1:
        raise MoECLIPError("--batch-size must be at least 1")
    out = Path(out)
    # the driver builds the runtime once, on the CPU: post-processing, the default object, and every
    # configuration error before a cluster is involved
    built = _replace(spec, device="cpu").build()
    post = built.post
    if spec.onnx:
        rules = ObjectRules(built.default_object, default_source="onnx")
    else:
        rules = ObjectRules.from_args(objects, class_map, built.default_object, built.object_source)
    del built
    jobs = list_inputs(inputs, rules, exclude=out)
    if not jobs:
        raise MoECLIPError("no input images found")
    writer = _Writer(out, overwrite=overwrite, resume=resume, maps=maps, overlays=overlays,
                     masks=post.pixel_threshold is not None)
    writer.pixel_threshold = post.pixel_threshold
    todo = [j for j in jobs if not writer.is_done(j)]
    summary = Summary(skipped=len(jobs) - len(todo))
    try:
        if todo:
            joined = connect(address)
            try:
                n, gpus = _plan_actors(actors, gpus_per_actor)
                tasks = bool(gpus) if render_in_tasks is None else render_in_tasks
                ds = _scored_dataset(_ray().data.from_items(_rows(todo)), spec, batch_size, n, gpus,
                                     DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
                                     outputs="render" if tasks else "files", maps=maps, overlays=overlays,
                                     crash=os.environ.get(CRASH_ENV))
                if tasks:  # GPU actors: the files rendered in CPU tasks, beside the GPUs
                    ds = ds.map_batches(_render_batch, batch_format="numpy",
                                        fn_kwargs={"post": post, "maps": maps, "overlays": overlays})
                    ds.context.execution_options.preserve_order = True
                try:
                    _drain(ds, {j.key: j for j in todo}, writer, summary, progress)
                except MoECLIPError:
                    raise
                except Exception as exc:  # Ray's own errors (dead actors, lost nodes): one line, not a trace
                    if not type(exc).__module__.startswith("ray"):
                        raise
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    done = "; the images scored so far are in results.jsonl" if writer.fh is not None else ""
                    raise MoECLIPError(f"--ray {address}: Ray failed ({type(exc).__name__}: {first}){done}; "
                                       "run the same command again (with --resume to keep what is done)") from exc
            finally:
                if joined:
                    _ray().shutdown()
    finally:
        writer.close()
    if writer.results.is_file():
        _write_parquet(out)
    return summary, post.threshold, writer.results


def predict_from_args(args: argparse.Namespace, spec: RuntimeSpec) -> int:
    """``moeclip predict --ray ...`` (the parsed flags of ``predict`` and its RuntimeSpec)."""
    summary, threshold, results = predict(
        args.inputs, spec, args.out, objects=args.object or (), class_map=args.class_map, address=args.ray,
        actors=args.ray_actors, gpus_per_actor=args.ray_gpus_per_actor, batch_size=args.batch_size,
        max_pixels=args.max_pixels, maps=not args.no_maps, overlays=not args.no_overlays, overwrite=args.overwrite,
        resume=args.resume)
    print(summary.line(threshold) + f" -> {results} (and {PARQUET_FILE})")
    return summary.exit_code

