"""CPU speed candidates for a trained checkpoint: latency and the depth error each one costs.

    .venv/bin/python bench/cpu_candidates.py --checkpoint CK --data S --split-file S/splits/test.txt \\
        --calib-split S/splits/train.txt --sizes 64x192 192x640      # the demo's held-out drive

Candidates: fp32 eager (the reference), eager with channels_last, torch.compile, ONNX Runtime
fp32 (the `onnxruntime` runtime), and ONNX Runtime int8: static QDQ quantisation of that export
(onnxruntime.quantization, per-channel weights, activations calibrated on `--calib-frames`
frames of `--calib-split`, MinMax), of every layer or of the encoder's convolutions only. Per network size: median latency of `--runs` forwards at
batch 1, and AbsRel (median scaling, eigen_benchmark rules; `--no-garg-crop` is implied for
synthetic drives) on the `--split-file` frames with the difference to eager. The issue's rule:
a candidate that loses more than 0.005 AbsRel is not a default. Not here: PT2E int8 (it lives in
torchao, not a dependency) and bf16 (no bf16 instructions on this CPU: bench/model_speed.py).
"""
from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffsql_model.checkpoint import load_model  # noqa: E402
from diffsql_model.data.kitti import read_split_file  # noqa: E402
from diffsql_model.data.network_input import to_tensor_resized  # noqa: E402
from diffsql_model.eval import protocols  # noqa: E402
from diffsql_model.export import OnnxModule  # noqa: E402
from diffsql_model.runtimes import build_runtime, depth_maps  # noqa: E402

CANDIDATES = ("eager", "channels_last", "compile", "onnxruntime", "onnxruntime_int8", "onnxruntime_int8_encoder")


def quantize_int8(fp32_onnx: pathlib.Path, out: pathlib.Path, calib: torch.Tensor,
                  encoder_convs: int = 0) -> pathlib.Path:
    """Static int8 (QDQ, per-channel weights, MinMax activations) of an exported model; with
    `encoder_convs`, only the first that many Conv nodes (the ResNet encoder: the graph is in
    execution order and its node names do not carry module names), the rest stays fp32."""
    class Reader(CalibrationDataReader):
        def __init__(self, name):
            self.items = iter([{name: x[None].numpy()} for x in calib])

        def get_next(self):
            return next(self.items, None)

    name = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_onnx), str(pre))
    convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
    only = convs[:encoder_convs] if encoder_convs else None
    quantize_static(str(pre), str(out), Reader(name), nodes_to_quantize=only,
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def build(name: str, model, size, calib: torch.Tensor, cache: pathlib.Path):
    """Candidate -> callable B x 3 x h x w -> B x h x w numpy depth."""
    if name == "eager":
        return lambda x: depth_maps(model, x)[:, 0].numpy()
    if name == "channels_last":  # a copy: the other candidates keep the contiguous model
        net = copy.deepcopy(model).to(memory_format=torch.channels_last)
        return lambda x: depth_maps(net, x.contiguous(memory_format=torch.channels_last))[:, 0].numpy()
    if name == "compile":
        rt = build_runtime(model, "compile", size)
        return lambda x: rt(x)[:, 0].numpy()
    rt = build_runtime(model, "onnxruntime", size, cache_dir=cache)
    if name == "onnxruntime":
        return lambda x: rt(x)[:, 0].numpy()
    encoder = sum(isinstance(m, torch.nn.Conv2d) for m in model.encoder.modules()) if name.endswith("encoder") else 0
    int8 = quantize_int8(rt.cache_path, cache / f"{name}-{size[0]}x{size[1]}.onnx", calib, encoder)
    module = OnnxModule(int8)
    return lambda x: module(x)["depth"][:, 0].float().numpy()


def latency_ms(fn, x: torch.Tensor, runs: int) -> float:
    fn(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, type=pathlib.Path)
    ap.add_argument("--data", required=True, type=pathlib.Path)
    ap.add_argument("--split-file", required=True, type=pathlib.Path)
    ap.add_argument("--calib-split", required=True, type=pathlib.Path, help="frames for int8 calibration")
    ap.add_argument("--calib-frames", type=int, default=32)
    ap.add_argument("--sizes", nargs="+", default=["64x192", "192x640"], help="network HxW")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, _ = load_model(a.checkpoint, torch.device("cpu"))
    model.eval()
    raw, depth_root = protocols.resolve_kitti_data(a.data)
    frames = protocols.eigen_benchmark_frames(read_split_file(a.split_file), depth_root, raw)
    calib_lines = read_split_file(a.calib_split)
    step = max(1, len(calib_lines) // a.calib_frames)
    calib_frames = protocols.eigen_benchmark_frames(calib_lines[::step][: a.calib_frames], depth_root, raw)
    cfg = protocols.EvalConfig.for_protocol("eigen_benchmark", garg_crop=False)
    print(f"{a.checkpoint}: {len(frames)} test frames, int8 calibrated on {len(calib_frames)}, "
          f"{a.threads} threads, median of {a.runs}")
    print("| network HxW | candidate | ms | FPS | AbsRel | AbsRel - eager | max abs depth diff vs eager (m) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for s in a.sizes:
            size = tuple(int(v) for v in s.split("x"))
            images = torch.stack([to_tensor_resized(f.load_image(), *size) for f in frames])
            calib = torch.stack([to_tensor_resized(f.load_image(), *size) for f in calib_frames])
            ref = None
            for name in a.candidates:
                try:
                    fn = build(name, model, size, calib, pathlib.Path(tmp))
                except Exception as e:  # a candidate that cannot build here is a row, not a crash
                    print(f"| {s} | {name} | failed: {type(e).__name__}: {str(e)[:120]} | | | | |", flush=True)
                    continue
                ms = latency_ms(fn, images[:1], a.runs)
                pred = np.concatenate([fn(images[i:i + 1]) for i in range(len(images))])
                abs_rel = protocols.run_evaluation(frames, list(pred), cfg)["metrics"]["abs_rel"]
                if ref is None:
                    ref = (abs_rel, pred)
                diff = float(np.abs(pred - ref[1]).max())
                print(f"| {s} | {name} | {ms:.1f} | {1000 / ms:.1f} | {abs_rel:.4f} | {abs_rel - ref[0]:+.4f} "
                      f"| {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
