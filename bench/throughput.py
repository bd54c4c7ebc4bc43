"""Throughput of URA-Net inference against its backbone alone, batch-1 latency, a training step and peak memory.

    python bench/throughput.py --device cpu --image-size 256 --batch-size 16
    python bench/throughput.py --device cuda --dtype bf16 --channels-last --batch-size 256
    python bench/throughput.py --device cuda --dtype bf16 --channels-last --sweep        # the settings grid
    python bench/throughput.py --device cpu --profile                                    # where the time goes
    python bench/throughput.py --device cuda --dtype bf16 --check                        # fast path == reference

Measured in one run, on random images already on the device (the data path is ``bench/data_throughput.py``):

(a) ``backbone``: the frozen CNN alone, input normalization to the deepest level URA-Net uses (the levels it
    returns, not pooled, resized or concatenated), under the same dtype / memory format / compile settings;
(b) ``inference``: URA-Net end to end through the fast path (``ura_monai.inference.fast.FastURANet``): the
    backbone, level aggregation, UIAPM, RAM, residual, maps at the input resolution (upsampling + Gaussian
    smoothing) and the image score, everything left on the device;
(c) ``train``: one training step (backbone under no_grad, FASM + UIAPM + RAM forward, URANetLoss, backward,
    AdamW), from images (``train_img_per_s``) and from cached features (``train_cached_img_per_s``).

Times are medians of timed loops after warm-up (CUDA events on the GPU; (a) and (b) interleaved so that both see
the same machine state); ``ratio`` = (b) / (a) images/s. ``peak_memory_mb``: peak CUDA memory allocated during
(b) on the GPU; on the CPU the peak resident set size of the process during (b) (model and inputs included).
The last line printed is one JSON object (with ``--sweep``: one JSON line per setting, then a summary object).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch

from ura_monai.inference.fast import FastURANet
from ura_monai.losses.ura_loss import URANetLoss
from ura_monai.networks.nets.ura_net import URANet
from ura_monai.utils.enums import AttentionMode, MapSource, Precision

DTYPES = {Precision.FP32.value: None, Precision.BF16.value: torch.bfloat16, Precision.FP16.value: torch.float16}
SWEEP = {"cpu": {"sizes": (256, 512), "batches": (1, 16)}, "cuda": {"sizes": (256, 512), "batches": (1, 64, 256)}}
# memory per training image ~ heads x N x (N + K) attention logits x ~6 float32 copies (logits, softmax, grads)
TRAIN_BUDGET_BYTES = {"cpu": 4 << 30, "cuda": 48 << 30}


# --------------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function; the functions are interleaved in every repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1000.0)
            else:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


class RSSPeak:
    """Peak resident set size (MiB) of this process while the context is open (sampled every 2 ms)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:  # not Linux
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_mb())
            time.sleep(0.002)

    def __enter__(self) -> RSSPeak:
        self.peak = self.rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg": load_avg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def cuda_graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` (no arguments, fixed inputs) captured once as a CUDA graph; returns the replay function."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        static_output = fn()

    def replay():
        graph.replay()
        return static_output

    return replay


def build_model(args, image_size: int, device: torch.device) -> URANet:
    torch.manual_seed(0)
    extra = {} if args.map_source is None else {"anomaly_map_source": args.map_source}
    model = URANet(
        backbone=args.backbone,
        image_size=image_size,
        pretrained=not args.random_weights,
        num_samples=args.uncertainty_samples,
        **extra,
    )
    return model.to(device).eval()


def backbone_alone(model: URANet) -> torch.nn.Module:
    """The frozen extractor returning its raw levels: no pooling, resizing or concatenation (shares the weights)."""
    trunk = copy.copy(model.feature_extractor)  # a shallow copy: same modules, own plain attributes
    trunk.smooth_kernel, trunk.feature_stride = 1, None
    return trunk


def fast_path(model: URANet, args) -> FastURANet:
    return FastURANet(
        model,
        dtype=DTYPES[args.dtype],
        channels_last=args.channels_last,
        attention=args.attention,
        compile=args.compile,
        compile_mode=args.compile_mode,
        cuda_graph=args.cuda_graph,
    )


def train_batch_size(args, device: torch.device, image_size: int, batch: int) -> int:
    if args.train_batch_size:
        return args.train_batch_size
    n = (image_size // 8) ** 2
    per_image = 4 * n * (n + 1024) * 4 * 6
    return max(1, min(batch, TRAIN_BUDGET_BYTES[device.type] // per_image))


# --------------------------------------------------------------------------------------------- measurements
def measure_inference(args, model: URANet, fast: FastURANet, device: torch.device, image_size: int, batch: int) -> dict:
    dtype = DTYPES[args.dtype]
    trunk = backbone_alone(model)
    trunk_fn = torch.compile(trunk, mode=args.compile_mode, dynamic=False) if args.compile else trunk
    images = torch.rand(batch, 3, image_size, image_size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def backbone_eager():
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=not args.cuda_graph),
        ):
            return trunk_fn(images)

    # with --cuda-graph the backbone alone is replayed as a graph too, so that (a) and (b) compare like with like
    run_backbone = cuda_graphed(backbone_eager, device) if args.cuda_graph and device.type == "cuda" else backbone_eager

    def run_inference():
        return fast(images, num_samples=args.uncertainty_samples)

    fns = {"backbone": run_backbone, "inference": run_inference}
    if args.reference:

        def run_reference():
            with torch.inference_mode():
                return model(images, num_samples=args.uncertainty_samples)

        fns["reference"] = run_reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t = timed(fns, device, args.warmup, args.repeats)
        # peak of (b) alone
        torch.cuda.reset_peak_memory_stats(device)
        run_inference()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        peak_over_base = peak - base / 2**20
    else:
        t = timed(fns, device, args.warmup, args.repeats)
        with RSSPeak() as rss:
            run_inference()
        peak, peak_over_base = rss.peak, None
    out = {
        "backbone_img_per_s": batch / t["backbone"],
        "inference_img_per_s": batch / t["inference"],
        "ratio": t["backbone"] / t["inference"],
        "backbone_ms_batch": t["backbone"] * 1000,
        "inference_ms_batch": t["inference"] * 1000,
        "peak_memory_mb": peak,
    }
    if peak_over_base is not None:
        out["peak_memory_over_model_mb"] = peak_over_base
    if "reference" in t:
        out["reference_img_per_s"] = batch / t["reference"]
        out["reference_ratio"] = t["backbone"] / t["reference"]
    return out


def measure_latency(args, fast: FastURANet, device: torch.device, image_size: int) -> float:
    image = torch.rand(1, 3, image_size, image_size, device=device)
    t = timed(
        {"b1": lambda: fast(image, num_samples=args.uncertainty_samples)},
        device,
        max(args.warmup, 3),
        max(args.repeats, 5),
    )
    return t["b1"] * 1000


def measure_train(args, model: URANet, device: torch.device, image_size: int, batch: int) -> dict:
    dtype = DTYPES[args.dtype]
    model = copy.deepcopy(model).train()
    loss_fn = URANetLoss(model.level_channels).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    images = torch.rand(batch, 3, image_size, image_size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    # features in the standard layout: GroupNorm's CPU backward crashes (torch 2.13) on channels-last input
    with torch.no_grad(), autocast():
        cached = model.feature_extractor(images).contiguous()

    def step(features: torch.Tensor | None) -> None:
        if features is None:
            with torch.no_grad(), autocast():
                features = model.feature_extractor(images).contiguous()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            losses = loss_fn(model(features=features, synthesize=True), model)
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            losses["loss"].backward()
            optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = timed({"images": lambda: step(None), "cached": lambda: step(cached)}, device, 1, max(1, args.train_repeats))
    out = {
        "train_img_per_s": batch / t["images"],
        "train_cached_img_per_s": batch / t["cached"],
        "train_batch_size": batch,
    }
    if device.type == "cuda":
        out["peak_memory_train_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run_setting(args, device: torch.device, image_size: int, batch: int, latency_ms: float | None = None) -> dict:
    model = build_model(args, image_size, device)
    fast = fast_path(model, args)
    result = {
        "device": device.type,
        "backbone": args.backbone,
        "image_size": image_size,
        "batch_size": batch,
        "dtype": args.dtype,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "cuda_graph": args.cuda_graph,
        "map_source": model.anomaly_map_source,
        "attention": fast._attention_mode(device),
        "uncertainty_samples": args.uncertainty_samples,
    }
    result.update(measure_inference(args, model, fast, device, image_size, batch))
    result["latency_ms_batch1"] = (
        latency_ms if latency_ms is not None else measure_latency(args, fast, device, image_size)
    )
    if not args.no_train:
        tb = train_batch_size(args, device, image_size, batch)
        try:
            result.update(measure_train(args, model, device, image_size, tb))
        except Exception as err:  # noqa: BLE001 - out of memory, say: report it, keep the inference figures
            result["train_error"] = (
                f"{type(err).__name__} at train batch {tb}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["load_avg"] = load_avg()
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}


# --------------------------------------------------------------------------------------------- profile
def profile_stages(args, device: torch.device) -> dict:
    """Milliseconds per stage of the fast path and of the reference path (median over ``--repeats`` runs; CPU
    wall clock or CUDA events), plus torch.profiler's most expensive operators of one fast-path run."""
    from torch.profiler import ProfilerActivity, profile

    from ura_monai.inference.fast import StageTimer
    from ura_monai.networks.blocks.feature_extractor import LITE0_STAGE_OF_LEVEL

    model = build_model(args, args.image_size, device)
    fast = fast_path(model, args)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    fe = model.feature_extractor
    timer = StageTimer(device)
    handles = []

    def hook_span(name: str, first: torch.nn.Module, last: torch.nn.Module) -> None:
        handles.append(first.register_forward_pre_hook(lambda _m, _i: timer.start(name)))
        handles.append(last.register_forward_hook(lambda _m, _i, _o: timer.stop(name)))

    # the CNN inside the extractor: from its input to the deepest level used (the rest of "features" is the
    # pooling / resizing / concatenation of the levels)
    if fe.backbone_name == "efficientnet_lite0":
        hook_span("backbone_cnn", fe.net._conv_stem, fe.net._blocks[max(LITE0_STAGE_OF_LEVEL[lv] for lv in fe.levels)])

    def reference_run():
        with torch.inference_mode():
            return model(images, num_samples=args.uncertainty_samples)

    result = {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "device": device.type,
        "map_source": model.anomaly_map_source,
    }
    for path in ("fast", "reference"):
        ref_handles = []
        if path == "reference":
            for name in ("feature_extractor", "uiapm", "ram", "map_generator"):
                module = getattr(model, name)
                if module is not None:
                    ref_handles.append(module.register_forward_pre_hook(lambda _m, _i, n=name: timer.start(n)))
                    ref_handles.append(module.register_forward_hook(lambda _m, _i, _o, n=name: timer.stop(n)))
        if path == "reference" and model.ram is not None and hasattr(model.ram, "prototype_distance"):
            method = model.ram.prototype_distance

            def timed_distance(*a, method=method, **k):
                with timer.span("prototype_distance"):
                    return method(*a, **k)

            model.ram.prototype_distance = timed_distance  # an instance attribute: shadows the method for this run
        fast.stage_timer = timer if path == "fast" else None
        run = (lambda: fast(images, num_samples=args.uncertainty_samples)) if path == "fast" else reference_run
        run()  # warm-up
        runs = []
        for _ in range(max(1, args.repeats)):
            timer.reset()
            with timer.span("total"):
                run()
            runs.append(timer.totals_ms())
        stages = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        if path == "fast":
            stages["features_aggregation"] = stages["features"] - stages.get("backbone_cnn", 0.0)
        else:
            stages["feature_extractor_aggregation"] = stages["feature_extractor"] - stages.get("backbone_cnn", 0.0)
            stages["residual_score_other"] = stages["total"] - sum(
                stages.get(k, 0.0) for k in ("feature_extractor", "uiapm", "ram", "prototype_distance", "map_generator")
            )
        result[path + "_ms"] = {k: round(v, 2) for k, v in stages.items()}
        result[path + "_share"] = {k: round(v / stages["total"], 3) for k, v in stages.items() if k != "total"}
        for h in ref_handles:
            h.remove()
        model.ram.__dict__.pop("prototype_distance", None) if model.ram is not None else None
    fast.stage_timer = None
    for h in handles:
        h.remove()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fast(images, num_samples=args.uncertainty_samples)
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, attr))[:15]
    result["fast_top_ops"] = [
        {"op": e.key, "ms": round(getattr(e, attr) / 1000.0, 2), "calls": e.count} for e in events
    ]
    result["load_avg"] = load_avg()
    return result


# --------------------------------------------------------------------------------------------- check
def check(args, device: torch.device) -> dict:
    """Fast paths on ``device`` against the reference path (``URANet.forward``) in fp32 on the CPU, same weights.

    fp32 variants (TF32 off) must agree within ``--tolerance`` (absolute); bf16/fp16 variants within
    ``--low-precision-tolerance`` x max(1, max |reference map|).
    """
    torch.manual_seed(1)
    images = torch.rand(args.check_batch, 3, args.image_size, args.image_size)
    images[:, :, 40:80, 60:120] = 1.0 - images[:, :, 40:80, 60:120]  # a structured "defect"
    reference_model = build_model(args, args.image_size, torch.device("cpu"))
    with torch.inference_mode():
        reference = reference_model(images, num_samples=0)
    scale = max(1.0, float(reference["anomaly_map"].abs().max()))
    keys = [k for k in ("anomaly_map", "pred_score", "perception_map", "uncertainty_map") if k in reference]
    model = build_model(args, args.image_size, device)
    results = {}
    variants = {"configured": {}}
    if args.check_all:
        variants = {
            "fp32_chunked": {
                "dtype": "fp32",
                "attention": "chunked",
                "channels_last": False,
                "cuda_graph": False,
                "compile": False,
            },
            "fp32_sdpa": {
                "dtype": "fp32",
                "attention": "sdpa",
                "channels_last": False,
                "cuda_graph": False,
                "compile": False,
            },
            "fp32_channels_last": {"dtype": "fp32", "channels_last": True, "cuda_graph": False, "compile": False},
            f"{args.dtype}_chunked": {"attention": "chunked", "cuda_graph": False, "compile": False},
            f"{args.dtype}_sdpa": {"attention": "sdpa", "cuda_graph": False, "compile": False},
            f"{args.dtype}_configured": {},
        }
        if device.type == "cuda":
            variants[f"{args.dtype}_cuda_graph"] = {"cuda_graph": True, "compile": False}
            variants["fp32_cuda_graph"] = {"dtype": "fp32", "cuda_graph": True, "compile": False}
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for name, override in variants.items():
        opts = argparse.Namespace(**{**vars(args), **override})
        low_precision = DTYPES[opts.dtype] is not None
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = low_precision and tf32[1]
        try:
            fast = fast_path(model, opts)
            out = fast(images.to(device), num_samples=0)
            errs = {k: float((out[k].float().cpu() - reference[k].float()).abs().max()) for k in keys}
            tol = args.low_precision_tolerance * scale if low_precision else args.tolerance
            results[name] = {
                "max_abs_error": errs,
                "tolerance": round(tol, 6),
                "ok": max(errs.values()) <= tol and set(out) == set(reference),
            }
        except Exception as err:  # noqa: BLE001 - report every variant
            results[name] = {
                "error": f"{type(err).__name__}: {err}"[:500],
                "ok": False,
                "max_abs_error": None,
                "tolerance": None,
            }
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {
        "map_source": model.anomaly_map_source,
        "image_size": args.image_size,
        "check": results,
        "map_range": [float(reference["anomaly_map"].min()), float(reference["anomaly_map"].max())],
        "ok": all(r["ok"] for r in results.values()),
    }


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path and the backbone-alone run")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune, reduce-overhead)")
    p.add_argument("--cuda-graph", action="store_true", help="replay the fast path as a CUDA graph per input shape")
    p.add_argument("--attention", default="auto", choices=AttentionMode.choices())
    p.add_argument(
        "--map-source",
        default=None,
        choices=MapSource.choices(),
        help="URANet anomaly_map_source (default: the model's default)",
    )
    p.add_argument(
        "--uncertainty-samples", type=int, default=0, help="stochastic perception passes (0: none, the fast path)"
    )
    p.add_argument("--warmup", type=int, default=None, help="default: 1 on the CPU, 3 on the GPU")
    p.add_argument("--repeats", type=int, default=None, help="default: 3 on the CPU, 10 on the GPU")
    p.add_argument("--train-repeats", type=int, default=None, help="default: 2 on the CPU, 5 on the GPU")
    p.add_argument("--train-batch-size", type=int, default=0, help="default: the batch size, capped by a memory budget")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--reference", action="store_true", help="also time the reference path (URANet.forward)")
    p.add_argument(
        "--random-weights", action="store_true", help="no ImageNet weights (throughput does not depend on them)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--sweep", action="store_true", help="run the settings grid of the device")
    p.add_argument("--sizes", default=None, help="comma-separated image sizes for --sweep")
    p.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes for --sweep")
    p.add_argument(
        "--profile", action="store_true", help="torch.profiler stage breakdown at --image-size / --batch-size"
    )
    p.add_argument("--check", action="store_true", help="fast path on --device against the CPU fp32 reference path")
    p.add_argument("--check-all", action="store_true", help="with --check: every attention / dtype / layout variant")
    p.add_argument("--check-batch", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=1e-3, help="max abs map error of fp32 fast paths")
    p.add_argument(
        "--low-precision-tolerance", type=float, default=5e-2, help="max abs map error of bf16/fp16 fast paths"
    )
    p.add_argument("--json-out", default=None, help="also append every JSON line to this file")
    p.add_argument(
        "--table", default=None, metavar="JSONL", help="print a markdown table of a --json-out file and exit"
    )
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.warmup = (1 if cpu else 3) if args.warmup is None else args.warmup
    args.repeats = (3 if cpu else 10) if args.repeats is None else args.repeats
    args.train_repeats = (2 if cpu else 5) if args.train_repeats is None else args.train_repeats
    return args


def table(path: str) -> str:
    """Markdown table of the throughput rows (and check results) of a JSON-lines file written with --json-out."""
    rows, checks = [], []
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        obj = json.loads(line)
        if "inference_img_per_s" in obj:
            rows.append(obj)
        elif "check" in obj:
            checks.append(obj)
    cols = [
        ("map_source", "map"),
        ("image_size", "size"),
        ("batch_size", "batch"),
        ("dtype", "dtype"),
        ("channels_last", "NHWC"),
        ("cuda_graph", "graph"),
        ("compile", "compile"),
        ("attention", "attention"),
        ("backbone_img_per_s", "backbone img/s"),
        ("inference_img_per_s", "URA-Net img/s"),
        ("ratio", "ratio"),
        ("reference_img_per_s", "reference img/s"),
        ("latency_ms_batch1", "b1 latency ms"),
        ("train_img_per_s", "train img/s"),
        ("train_batch_size", "train batch"),
        ("peak_memory_mb", "peak MiB"),
    ]
    out = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k, _ in cols) + " |")
    for c in checks:
        for name, res in c["check"].items():
            out.append(
                f"\ncheck {c.get('map_source')} {name}: ok={res['ok']} max_abs_error={res['max_abs_error']} tolerance={res['tolerance']}"
            )
    return "\n".join(out)


def emit(obj: dict, args) -> None:
    line = json.dumps(obj)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(line + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    header = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(device),
        "argv": sys.argv[1:],
    }
    if args.check:
        result = header | check(args, device)
        emit(result, args)
        return 0 if result["ok"] else 1
    if args.profile:
        emit(header | profile_stages(args, device), args)
        return 0
    if not args.sweep:
        emit(header | run_setting(args, device, args.image_size, args.batch_size), args)
        return 0
    grid = SWEEP[device.type]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else grid["sizes"]
    batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else grid["batches"]
    rows = []
    for size in sizes:
        latency = None
        for batch in batches:
            try:
                row = run_setting(args, device, size, batch, latency)
            except Exception as err:  # noqa: BLE001 - one failing setting must not lose the others
                emit({"image_size": size, "batch_size": batch, "error": f"{type(err).__name__}: {err}"[:500]}, args)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            latency = row["latency_ms_batch1"]
            rows.append(row)
            emit(row, args)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    keys = (
        "image_size",
        "batch_size",
        "backbone_img_per_s",
        "inference_img_per_s",
        "ratio",
        "latency_ms_batch1",
        "train_img_per_s",
        "peak_memory_mb",
    )
    emit(
        header
        | {
            "summary": [{k: r.get(k) for k in keys} for r in rows],
            "min_ratio": min((r["ratio"] for r in rows), default=None),
        },
        args,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
