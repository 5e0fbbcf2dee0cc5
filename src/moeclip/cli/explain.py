"""``moeclip explain``: what the experts and the 12 feature maps do on one image.

Writes, into ``--out``:

* ``layer<i>_block<b>_experts.png`` per MoE layer: the patches where each expert is top-1,
  with the mean renormalised weight the router gives it there;
* ``entropy.png``: the router's entropy per patch, one panel per MoE layer;
* ``contributions.png``: the anomaly map and each feature map's blurred, upsampled share;
* ``explain.json`` (the numbers), ``explain.npz`` (the raw arrays) and ``index.html``.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from ..errors import MoECLIPError

INDEX = "index.html"
JSON_FILE = "explain.json"


def register(subparsers) -> None:
    from .common import add_domain_arg, add_model_args

    p = subparsers.add_parser(
        "explain", help="per-expert routing maps, router entropy and per-map contributions for one image",
        description="Show which expert each patch goes to at every MoE layer, how sure the router is, "
                    "and how much each of the feature maps adds to the anomaly map.")
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("--object", default=None, metavar="TEXT",
                   help="object description for the prompts, e.g. 'metal nut' (default: 'object')")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (PNGs, explain.json, index.html)")
    add_domain_arg(p, "sets the blur of the anomaly map (default industrial)", default="industrial")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier explanation in --out")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    from PIL import Image

    from ..analysis import viz
    from ..data.imageio import load_image
    from ..data.transforms import preprocess_image
    from ..analysis.explain import explain_image
    from ..precision import autocast
    from ..model.prompts import GENERIC_OBJECT
    from .common import detector_from_args

    out = Path(args.out)
    if (out / JSON_FILE).exists() and not args.overwrite:
        raise MoECLIPError(f"{out}: holds an earlier explanation (use --overwrite to replace it)")
    pil = load_image(args.image)
    det = detector_from_args(args)
    model, size = det.model, det.image_size
    obj = args.object or GENERIC_OBJECT
    batch = preprocess_image(pil, size)[None].to(det.device)
    with autocast(det.device, det.precision):
        ex = explain_image(model, batch, det.text_features(obj), args.domain)
    image = np.asarray(pil.resize((size, size), Image.BICUBIC))
    cfg = model.adapter_config
    out.mkdir(parents=True, exist_ok=True)

    files = {"experts": [], "entropy": "entropy.png", "contributions": "contributions.png"}
    titles = [f"MoE layer {i} (after block {b})" for i, b in enumerate(ex.blocks)]
    for i, (b, top1, cnt, mw) in enumerate(zip(ex.blocks, ex.top1, ex.top1_count, ex.top1_mean_weight)):
        name = f"layer{i}_block{b}_experts.png"
        viz.save_figure(viz.expert_selection_figure(image, top1, cnt, mw, titles[i]), out / name)
        files["experts"].append(name)
    viz.save_figure(viz.entropy_figure(image, ex.entropy, titles, ex.max_entropy), out / files["entropy"])
    viz.save_figure(viz.contributions_figure(image, ex.anomaly_map, ex.smoothed, ex.labels, len(cfg.paa_radii)),
                    out / files["contributions"])
    np.savez_compressed(out / "explain.npz", top1=np.stack(ex.top1), entropy=np.stack(ex.entropy),
                        contributions=ex.contributions, smoothed=ex.smoothed, anomaly_map=ex.anomaly_map)

    doc = {"image": str(args.image), "object": obj, "domain": args.domain, "checkpoint": str(args.checkpoint),
           "image_size": size, "top_k": cfg.top_k, **ex.to_dict(), "files": {**files, "arrays": "explain.npz"}}
    (out / JSON_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    (out / INDEX).write_text(render_index(doc))
    print(f"explanation written to {out / INDEX}")
    return 0


def _num(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


def render_index(doc: dict) -> str:
    """A plain page that shows the PNGs (relative links) with the numbers beside them."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>moeclip explain: {e(doc['image'])}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}img{max-width:100%;"
             "border:1px solid #ccc}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
             "padding:2px 8px;text-align:right}th{background:#f3f3f3}</style></head><body>",
             f"<h1>What the experts do</h1><p>image <code>{e(doc['image'])}</code>, object "
             f"<b>{e(doc['object'])}</b>, domain {e(doc['domain'])}, checkpoint <code>{e(doc['checkpoint'])}</code>. "
             f"Raw image score {_num(doc['anomaly']['raw_image_score'])}, anomaly map max "
             f"{_num(doc['anomaly']['map_max'], '{:.2f}')}.</p>",
             "<h2>Routing</h2><p>Per MoE layer: the patches where each expert is the top-1 choice; "
             f"<i>mean weight</i> is the expert's renormalised top-{doc['top_k']} weight on those patches.</p>"]
    for layer, name in zip(doc["layers"], doc["files"]["experts"]):
        rows = "".join(f"<tr><td>{x['expert']}</td><td>{x['top1_patches']}</td><td>{100 * x['top1_fraction']:.1f}%"
                       f"</td><td>{_num(x['mean_weight'])}</td></tr>" for x in layer["experts"])
        parts.append(f"<h3>after block {layer['block']}</h3><img src='{e(name)}' alt='experts, block "
                     f"{layer['block']}'><table><tr><th>expert</th><th>top-1 patches</th><th>share</th>"
                     f"<th>mean weight</th></tr>{rows}</table><p>router entropy: mean "
                     f"{layer['entropy']['mean']:.3f} nats (uniform {layer['entropy']['uniform']:.3f})</p>")
    parts.append(f"<h2>Router entropy</h2><img src='{e(doc['files']['entropy'])}' alt='router entropy'>")
    rows = "".join(f"<tr><td style='text-align:left'>{e(m['name'])}</td><td>{m['patch_mean']:.2f}</td>"
                   f"<td>{m['patch_max']:.2f}</td><td>{m['at_peak']:.2f}</td></tr>" for m in doc["anomaly"]["maps"])
    parts.append(f"<h2>Feature-map contributions</h2><p>The anomaly map is the sum of the per-map scores "
                 f"(blurred and upsampled). Peak at pixel {doc['anomaly']['peak']}.</p>"
                 f"<img src='{e(doc['files']['contributions'])}' alt='contributions'>"
                 f"<table><tr><th>map</th><th>patch mean</th><th>patch max</th><th>at peak</th></tr>{rows}</table>"
                 f"<p>Numbers: <a href='{JSON_FILE}'>{JSON_FILE}</a>, arrays: "
                 f"<a href='{e(doc['files']['arrays'])}'>{e(doc['files']['arrays'])}</a>.</p></body></html>\n")
    return "\n".join(parts)
