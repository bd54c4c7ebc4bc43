"""Peak memory of ``predict_dicom_folder`` on a generated 500-slice DICOM series.

Writes a 500-slice 256x256 16-bit MR series (single-frame files, pydicom) into a temporary folder,
then runs ``predict_dicom_folder`` with a dummy predictor in a fresh subprocess per configuration,
measuring the peak resident set size (``resource.getrusage``) and the peak of traced Python/numpy
allocations (``tracemalloc``) against the size of the float32 volume.

Prints one JSON line::

    {"slices": 500, "volume_mb": ..., "peak_rss_mb": ..., "rss_growth_mb": ..., ...}

``rss_growth_mb`` is the streaming core (NIfTI maps, report, CSV; ``write_dicom=False``): it should
stay far below ``volume_mb`` and not grow with the number of slices (compare
``rss_growth_100_slices_mb``). ``rss_growth_with_dicom_mb`` adds the highdicom Parametric Map and
SEG, which are built in memory (about one to a few volumes).

Usage::

    python bench/dicom_memory.py [--slices 500] [--size 256] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def write_series(folder: Path, slices: int, size: int) -> None:
    """Write an axial single-frame MR series with pydicom (one file per slice)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_of_reference_uid = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    base = (rng.random((size, size)) * 1000).astype(np.uint16)
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            study_uid,
            series_uid,
            frame_of_reference_uid,
        )
        ds.Modality, ds.PatientName, ds.PatientID = "MR", "Bench^Patient", "BENCH"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 1.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.9, 0.9]
        ds.SliceThickness = 1.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.roll(base, k, axis=0).tobytes()
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)


_CHILD = r"""
import json, resource, sys, tracemalloc
import torch
from ura_monai.inference.dicom_inference import predict_dicom_folder

class DummyPredictor:
    image_threshold = 0.5
    def __call__(self, images):
        anomaly_map = images.mean(dim=1)
        return {"anomaly_map": anomaly_map, "uncertainty_map": 1.0 - anomaly_map,
                "pred_score": anomaly_map.flatten(1).amax(1)}

def rss_mb():  # current resident set size
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * resource.getpagesize() / 2**20

input_dir, output_dir, write_dicom, batch_size = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
DummyPredictor()(torch.zeros(1, 1, 8, 8))  # warm up torch before the baseline
baseline = rss_mb()
tracemalloc.start()
rows = predict_dicom_folder(
    input_dir, output_dir, DummyPredictor(), batch_size=batch_size, write_dicom=write_dicom, progress=False
)
traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
tracemalloc.stop()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
assert [r["status"] for r in rows] == ["ok"], rows
# ru_maxrss is a high-water mark: peak - baseline is an upper bound of what the run added
print(json.dumps({"baseline_rss_mb": baseline, "peak_rss_mb": peak, "rss_growth_mb": peak - baseline,
                  "traced_peak_mb": traced_peak, "read_infer_s": float(rows[0]["time_read_infer_s"]),
                  "write_s": float(rows[0]["time_write_s"])}))
"""


def measure(input_dir: Path, output_dir: Path, write_dicom: bool, batch_size: int) -> dict:
    """Run one configuration in a fresh interpreter (ru_maxrss is a per-process high-water mark)."""
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD, str(input_dir), str(output_dir), "1" if write_dicom else "0", str(batch_size)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ura-dicom-bench-") as temporary:
        root = Path(temporary)
        write_series(root / "series_large", args.slices, args.size)
        write_series(root / "series_small", max(1, args.slices // 5), args.size)
        core = measure(root / "series_large", root / "out_core", write_dicom=False, batch_size=args.batch_size)
        small = measure(root / "series_small", root / "out_small", write_dicom=False, batch_size=args.batch_size)
        with_dicom = measure(root / "series_large", root / "out_dicom", write_dicom=True, batch_size=args.batch_size)

    volume_mb = args.slices * args.size * args.size * 4 / 2**20
    print(
        json.dumps(
            {
                "slices": args.slices,
                "volume_mb": round(volume_mb, 1),
                "peak_rss_mb": round(core["peak_rss_mb"], 1),
                "rss_growth_mb": round(core["rss_growth_mb"], 1),
                "traced_peak_mb": round(core["traced_peak_mb"], 1),
                f"rss_growth_{max(1, args.slices // 5)}_slices_mb": round(small["rss_growth_mb"], 1),
                "rss_growth_with_dicom_mb": round(with_dicom["rss_growth_mb"], 1),
                "read_infer_s": round(core["read_infer_s"], 2),
                "write_s": round(core["write_s"], 2),
                "write_with_dicom_s": round(with_dicom["write_s"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
