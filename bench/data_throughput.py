"""Images/s of the data path: JPEG decode + resize + tensors (``anomaly_transforms``) through a ``DataLoader``.

    python bench/data_throughput.py                          # 96 generated 512x512 JPEGs -> 256, workers 0/1/2
    python bench/data_throughput.py --workers 0,2,4,8,16 --device-resize --device cuda

Modes (each a JSON line; the last line printed is a summary JSON object):

- ``transforms``: ``anomaly_transforms(image_size)`` (decode to float32 in [0, 1], anti-aliased bilinear resize,
  zero mask) in the workers, default collation; what ``fit`` / ``test`` / ``run_inference`` use.
- ``device_resize`` (``--device-resize``): the workers only decode to uint8 (C, H, W); the batch goes to
  ``--device`` as uint8 (4x fewer bytes) and is scaled and resized there with the same
  ``F.interpolate(antialias=True)`` call as ``ResizeAnomaly``. Checked against ``transforms`` (max abs difference
  reported). On a GPU this moves the resize off the CPU.

Images/s counts the whole loop (workers started once per measurement, first epoch discarded as warm-up of the
file cache and the workers). Stage costs per image on one core are reported too (``decode_ms``, ``resize_ms``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset as TorchDataset

from ura_monai.data.transforms import ResizeAnomaly, anomaly_transforms, read_image_array


def make_jpegs(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """Smooth random colour images (JPEG quality 90): realistic entropy, not white noise."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        low = rng.random((size // 16, size // 16, 3)).astype(np.float32)
        img = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (size, size, 3))
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


class _Dataset(TorchDataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.transform(self.items[i])


def _decode_uint8(item: dict) -> dict:
    with Image.open(item["image"]) as img:
        arr = np.asarray(img.convert("RGB"))
    return {"image": torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))}


def loop(loader, epochs: int, on_batch=None) -> float:
    """Images/s over ``epochs`` epochs after one warm-up epoch."""
    for batch in loader:  # warm-up: workers, file cache
        if on_batch:
            on_batch(batch)
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            if on_batch:
                on_batch(batch)
            count += batch["image"].shape[0]
    return count / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=96)
    p.add_argument("--source-size", type=int, default=512)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device-resize", action="store_true", help="also measure decode-only workers + resize on --device")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads of the main process (0: default)")
    p.add_argument("--folder", default=None, help="use/keep the JPEGs here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = None
    if args.folder:
        folder = Path(args.folder)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
    paths = sorted(folder.glob("img_*.jpg"))[: args.num_images]
    if len(paths) < args.num_images:
        paths = make_jpegs(folder, args.num_images, args.source_size)
    items = [{"image": str(path), "mask": "", "label": 0} for path in paths]
    header = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "num_images": len(items),
        "source_size": args.source_size,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "main_threads": torch.get_num_threads(),
    }

    # per-stage cost on one core, for the record
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    resizer = ResizeAnomaly(args.image_size, "bilinear")
    decode_t, resize_t = [], []
    for path in paths[:32]:
        t0 = time.perf_counter()
        image = torch.from_numpy(read_image_array(path))
        t1 = time.perf_counter()
        resizer(image)
        decode_t.append(t1 - t0)
        resize_t.append(time.perf_counter() - t1)
    torch.set_num_threads(threads)
    header["decode_ms"] = round(statistics.median(decode_t) * 1000, 2)
    header["resize_ms"] = round(statistics.median(resize_t) * 1000, 2)

    rows = []
    transform = anomaly_transforms(args.image_size, augment=False)
    device = torch.device(args.device)
    for workers in [int(w) for w in args.workers.split(",")]:
        loader = TorchDataLoader(
            _Dataset(items, transform), batch_size=args.batch_size, num_workers=workers, persistent_workers=workers > 0
        )
        row = {"mode": "transforms", "num_workers": workers, "img_per_s": round(loop(loader, args.epochs), 1)}
        rows.append(row)
        print(json.dumps(header | row), flush=True)
        del loader
        if args.device_resize:
            size = (args.image_size, args.image_size)

            def on_batch(batch, size=size):
                x = batch["image"].to(device, non_blocking=True).float().div_(255.0)
                F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            loader = TorchDataLoader(
                _Dataset(items, _decode_uint8),
                batch_size=args.batch_size,
                num_workers=workers,
                persistent_workers=workers > 0,
            )
            row = {
                "mode": "device_resize",
                "device": device.type,
                "num_workers": workers,
                "img_per_s": round(loop(loader, args.epochs, on_batch), 1),
            }
            rows.append(row)
            print(json.dumps(header | row), flush=True)
            del loader
    if args.device_resize:  # same pixels as the reference transforms?
        ref = transform(items[0])["image"]
        x = _decode_uint8(items[0])["image"][None].to(device).float().div_(255.0)
        got = F.interpolate(
            x, size=(args.image_size, args.image_size), mode="bilinear", antialias=True, align_corners=False
        )[0].cpu()
        header["device_resize_max_abs_diff"] = float((got - ref).abs().max())
    print(json.dumps(header | {"summary": rows}), flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
