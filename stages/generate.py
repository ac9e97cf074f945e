"""`stage=generate`: images through the real serving path, saved to disk.

Starts the Ray Serve app on ``serve.host:serve.port`` with the weights ``serve.*`` names, posts each prompt to
``/generate`` over HTTP, saves the PNGs and a grid under ``<root>/generated/``, logs them to MLflow and shuts the app
down. It is how `stage=demo` ends: what a user gets from a served model, not a shortcut around it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import urllib.request

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pipeline import storage
from pipeline.context import StageContext

log = logging.getLogger(__name__)


def request_body(gen_cfg, prompt: str, index: int) -> dict:
    body = {"prompt": prompt, "seed": int(gen_cfg.seed) + index, "refiner": bool(gen_cfg.refiner),
            "num_images": int(gen_cfg.num_images), "format": "png"}
    for key in ("width", "height", "steps"):
        if gen_cfg.get(key) is not None:
            body[key] = int(gen_cfg[key])
    # Unset (null): the server uses each model's unconditional input; a string, even "", is sent and encoded.
    if gen_cfg.get("negative_prompt") is not None:
        body["negative_prompt"] = str(gen_cfg.negative_prompt)
    return body


def post_generate(url: str, body: dict, timeout_s: float) -> list[Image.Image]:
    req = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        payload = resp.read()
        if resp.headers.get("Content-Type", "").startswith("image/"):
            return [Image.open(io.BytesIO(payload)).convert("RGB")]
    import base64

    return [Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB") for b64 in json.loads(payload)["images"]]


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    from ray import serve

    from stages.serve.app import start

    gen = cfg.generate
    if not gen.prompts:
        raise ValueError("generate.prompts is empty: give at least one prompt")
    out_dir = storage.join(ctx.root, "generated")
    url = start(cfg, ctx.tracking_uri)
    images, outputs = [], []
    try:
        for i, prompt in enumerate(gen.prompts):
            for j, image in enumerate(post_generate(url, request_body(gen, str(prompt), i),
                                                    float(cfg.serve.request_timeout_s))):
                path = storage.join(out_dir, f"{i:03d}_{j}.png")
                storage.write_bytes_atomic(path, _png(image))
                images.append(image)
                outputs.append(path)
    finally:
        serve.shutdown()
    grid = image_grid(images, columns=len(gen.prompts))
    grid_path = storage.join(out_dir, "grid.png")
    storage.write_bytes_atomic(grid_path, _png(grid))
    storage.write_json_atomic(storage.join(out_dir, "prompts.json"),
                              {"prompts": list(OmegaConf.to_container(gen.prompts)), "files": outputs})
    local_grid = os.path.join(ctx.scratch_dir(), "generated_grid.png")
    grid.save(local_grid)
    ctx.log_artifact(local_grid, "generated")
    log.info("wrote %d images and %s", len(images), grid_path)
    return {"images": len(images), "grid": grid_path, "outputs": [grid_path, *outputs]}
