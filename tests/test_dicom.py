"""DICOM series discovery, volume inference and result writing, on generated series and the shared MR.

The tests check the pipeline (geometry, ordering, outputs, references), not the model: the
predictor is a dummy whose anomaly map is the input image itself.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    MRImageStorage,
    OphthalmicTomographyImageStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)

from ura_monai.data.dicom import (
    compute_intensity_window,
    dicom_slice_datalist,
    discover_series,
    iter_series_slices,
    load_series_volume,
    series_affine,
)
from ura_monai.inference.dicom_inference import predict_dicom_folder
from ura_monai.inference.dicom_writers import highdicom_available
from ura_monai.utils.fileio import atomic_path, atomic_write_text
from ura_monai.utils.paths import OUTPUT_MARKER_NAME

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-98765"
PHI_STRINGS = ("Doe", "Jane", PATIENT_ID)

needs_highdicom = pytest.mark.skipif(
    not highdicom_available(), reason="highdicom not installed (pip install ura-monai[dicom])"
)


# --------------------------------------------------------------------------------------------
# generated DICOM
# --------------------------------------------------------------------------------------------


def _base_dataset(
    sop_class_uid: str, study_uid: str, series_uid: str, modality: str, transfer_syntax=ExplicitVRLittleEndian
) -> Dataset:
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = sop_class_uid
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 3
    ds.Manufacturer = "test"
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    ds.Rows, ds.Columns = (
        pixels.shape[-2:] if pixels.ndim != 3 or ds.get("SamplesPerPixel", 1) == 1 else pixels.shape[:2]
    )
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = pixels.tobytes()


def write_mr_series(
    folder: Path,
    study_uid: str,
    positions: list[tuple[float, float, float]],
    orientation: tuple[float, ...],
    rows: int,
    cols: int,
    pixel_spacing: tuple[float, float],
    dtype=np.uint16,
    slope: float = 1.0,
    intercept: float = 0.0,
    frame_of_reference_uid: str | None = None,
    series_uid: str | None = None,
    transfer_syntax=ExplicitVRLittleEndian,
    rng: random.Random | None = None,
) -> dict:
    """Write single-frame MR slices; slice k (in ``positions`` order) holds values 100*k + a ramp.

    Files get random names and InstanceNumbers are shuffled, so only positions give the order.
    """
    rng = rng or random.Random(0)
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    instance_numbers = list(range(1, len(positions) + 1))
    rng.shuffle(instance_numbers)
    sop_uids, paths = [], []
    for k, position in enumerate(positions):
        ds = _base_dataset(MRImageStorage, study_uid, series_uid, "MR", transfer_syntax)
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = instance_numbers[k]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [pixel_spacing[0], pixel_spacing[1]]
        ds.SliceThickness = 2.0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ramp = (np.arange(rows)[:, None] + 2 * np.arange(cols)[None, :]) % 50
        stored = (100 * k + ramp - (150 if dtype == np.int16 else 0)).astype(dtype)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        _set_pixels(ds, stored)
        if transfer_syntax != ExplicitVRLittleEndian:  # a compressed object whose fragments are not valid
            ds.PixelData = encapsulate([b"\xff\xd8" + bytes(64) + b"\xff\xd9"])
            ds["PixelData"].VR = "OB"
        path = folder / f"img_{rng.randrange(16**8):08x}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(ds.SOPInstanceUID)
        paths.append(path)
    return {"uid": series_uid, "for_uid": frame_of_reference_uid, "sop_uids": sop_uids, "paths": paths}


def write_multiframe(
    path: Path,
    study_uid: str,
    sop_class_uid: str = EnhancedMRImageStorage,
    modality: str = "MR",
    frames: int = 4,
    rows: int = 20,
    cols: int = 24,
    dtype=np.uint16,
) -> dict:
    """A multi-frame object with per-frame plane positions stored in reverse spatial order."""
    series_uid, for_uid = generate_uid(), generate_uid()
    ds = _base_dataset(sop_class_uid, study_uid, series_uid, modality)
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20240101", "120000", "20240101120000"
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.4, 0.6]
    measures.SliceThickness = 1.5
    shared.PixelMeasuresSequence = [measures]
    plane_orientation = Dataset()
    plane_orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = [plane_orientation]
    transformation = Dataset()
    transformation.RescaleSlope, transformation.RescaleIntercept, transformation.RescaleType = 1, 0, "US"
    shared.PixelValueTransformationSequence = [transformation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    volume = np.empty((frames, rows, cols), dtype=dtype)
    for frame in range(frames):
        item = Dataset()
        plane_position = Dataset()
        spatial_index = frames - 1 - frame  # frame 0 is the top slice
        plane_position.ImagePositionPatient = [5.0, -3.0, 10.0 + 1.5 * spatial_index]
        item.PlanePositionSequence = [plane_position]
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = spatial_index + 1
        content.DimensionIndexValues = [1, spatial_index + 1]
        item.FrameContentSequence = [content]
        per_frame.append(item)
        volume[frame] = 10 * spatial_index + 1
    ds.PerFrameFunctionalGroupsSequence = per_frame
    _set_pixels(ds, volume)
    ds.save_as(path, enforce_file_format=True)
    return {"uid": series_uid, "for_uid": for_uid, "sop_uids": [ds.SOPInstanceUID]}


def write_rgb_image(path: Path, study_uid: str) -> str:
    ds = _base_dataset(SecondaryCaptureImageStorage, study_uid, generate_uid(), "XC")
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    pixels = np.zeros((12, 16, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[4:8, 4:8] = (0, 255, 0)
    _set_pixels(ds, pixels)
    ds.Rows, ds.Columns = 12, 16
    ds.save_as(path, enforce_file_format=True)
    return ds.SeriesInstanceUID


def write_structured_report(path: Path, study_uid: str) -> None:
    ds = _base_dataset("1.2.840.10008.5.1.4.1.1.88.11", study_uid, generate_uid(), "SR")
    ds.ValueType = "CONTAINER"
    ds.save_as(path, enforce_file_format=True)


def write_dicomdir_like(path: Path) -> None:
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = file_meta
    ds.FileSetID = "TEST"
    ds.DirectoryRecordSequence = []
    ds.save_as(path, enforce_file_format=True)


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# a rotated (oblique) plane: rows along (cos, sin, 0), columns along (0, cos, -sin)-ish, orthonormal
_c, _s = np.cos(0.3), np.sin(0.3)
OBLIQUE = (float(_c), float(_s), 0.0, float(-_s * 0.8), float(_c * 0.8), 0.6)


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory) -> dict:
    """A PACS-like export: two series mixed in one folder, a multi-frame object, a bad series and junk."""
    root = tmp_path_factory.mktemp("export")
    rng = random.Random(1)
    study_uid = generate_uid()
    (root / "mixed").mkdir()
    axial_positions = [(-10.0, -20.0, 30.0 + 2.0 * k) for k in range(6)]
    series_a = write_mr_series(
        root / "mixed", study_uid, axial_positions, AXIAL, rows=32, cols=40, pixel_spacing=(0.5, 0.7), rng=rng
    )
    normal = np.cross(OBLIQUE[:3], OBLIQUE[3:])
    oblique_positions = [tuple((np.array([3.0, 4.0, -5.0]) + 1.25 * k * normal).tolist()) for k in range(5)]
    series_b = write_mr_series(
        root / "mixed",
        study_uid,
        oblique_positions,
        OBLIQUE,
        rows=24,
        cols=28,
        pixel_spacing=(0.8, 0.8),
        dtype=np.int16,
        slope=2.0,
        intercept=-100.0,
        rng=rng,
    )
    (root / "enhanced").mkdir()
    multiframe = write_multiframe(root / "enhanced" / "enhanced_mr.dcm", study_uid)
    (root / "compressed").mkdir()
    compressed = write_mr_series(
        root / "compressed",
        study_uid,
        [(0.0, 0.0, float(k)) for k in range(3)],
        AXIAL,
        rows=8,
        cols=8,
        pixel_spacing=(1.0, 1.0),
        transfer_syntax=JPEGLosslessSV1,
        rng=rng,
    )
    junk = root / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("exported by PACS\n")
    # a seventh slice of series A cut in its pixel data, and a file cut inside its header
    extra = write_mr_series(
        junk,
        study_uid,
        [(-10.0, -20.0, 42.0)],
        AXIAL,
        rows=32,
        cols=40,
        pixel_spacing=(0.5, 0.7),
        series_uid=series_a["uid"],
        frame_of_reference_uid=series_a["for_uid"],
        rng=rng,
    )
    data = extra["paths"][0].read_bytes()
    truncated = junk / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 1000])
    extra["paths"][0].unlink()
    (junk / "header_cut.dcm").write_bytes(series_b["paths"][0].read_bytes()[:300])
    write_structured_report(junk / "report_sr.dcm", study_uid)
    write_dicomdir_like(root / "DICOMDIR")
    return {
        "root": root,
        "study_uid": study_uid,
        "a": series_a,
        "b": series_b,
        "multiframe": multiframe,
        "compressed": compressed,
        "truncated": truncated,
    }


class DummyPredictor:
    """anomaly map = the image (channel mean), uncertainty = 1 - image, score = max of the map."""

    image_threshold = 0.5

    def __init__(self) -> None:
        self.channels_seen: set[int] = set()
        self.largest_batch = 0

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        assert images.dtype == torch.float32 and images.ndim == 4
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        self.channels_seen.add(int(images.shape[1]))
        self.largest_batch = max(self.largest_batch, int(images.shape[0]))
        anomaly_map = images.mean(dim=1)
        return {
            "anomaly_map": anomaly_map,
            "uncertainty_map": 1.0 - anomaly_map,
            "pred_score": anomaly_map.flatten(1).amax(1),
        }


def _sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    """SimpleITK's LPS geometry as a RAS affine for voxel order (x, y, z) = (column, row, slice)."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _read_sitk_series(folder: Path, series_uid: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    return reader.Execute()


def _read_results(output: Path) -> list[dict]:
    with open(output / "results.csv", newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def folder_run(dicom_folder, tmp_path_factory) -> dict:
    """predict_dicom_folder on the generated export (once for the module)."""
    output = tmp_path_factory.mktemp("results") / "out"
    predictor = DummyPredictor()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    package_logger = logging.getLogger("ura_monai")
    package_logger.addHandler(handler)
    previous_level = package_logger.level
    package_logger.setLevel(logging.DEBUG)
    try:
        rows = predict_dicom_folder(dicom_folder["root"], output, predictor, batch_size=4, top_k=3, progress=False)
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
    return {"output": output, "rows": rows, "predictor": predictor, "log": "\n".join(r.getMessage() for r in records)}


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------


def test_discover_groups_orders_and_skips(dicom_folder):
    series, skipped = discover_series(dicom_folder["root"])
    by_uid = {s.uid: s for s in series}
    assert set(by_uid) == {dicom_folder[k]["uid"] for k in ("a", "b", "multiframe", "compressed")}

    a = by_uid[dicom_folder["a"]["uid"]]
    assert (a.num_frames, a.rows, a.cols, a.modality, a.is_multiframe) == (6, 32, 40, "MR", False)
    assert a.spacing == pytest.approx((0.5, 0.7, 2.0))
    assert [p[2] for p in a.positions] == pytest.approx([30, 32, 34, 36, 38, 40])  # by position, not InstanceNumber
    assert [s.sop_instance_uid for s in a.slices] == dicom_folder["a"]["sop_uids"]
    assert len(a.skipped_files) == 1 and "truncated" in a.skipped_files[0].reason

    b = by_uid[dicom_folder["b"]["uid"]]
    assert b.spacing == pytest.approx((0.8, 0.8, 1.25))
    assert [s.sop_instance_uid for s in b.slices] == dicom_folder["b"]["sop_uids"]
    assert not b.warnings

    multiframe = by_uid[dicom_folder["multiframe"]["uid"]]
    assert multiframe.is_multiframe and multiframe.num_frames == 4 and len(multiframe.files) == 1
    assert [s.frame_index for s in multiframe.slices] == [3, 2, 1, 0]  # frames were stored top-down
    assert multiframe.spacing == pytest.approx((0.4, 0.6, 1.5))

    compressed = by_uid[dicom_folder["compressed"]["uid"]]
    if not pydicom.pixels.get_decoder(JPEGLosslessSV1).is_available:
        assert any("pip install" in w and "pylibjpeg" in w for w in compressed.warnings)

    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert "not a DICOM file" in reasons["notes.txt"]
    assert "DICOMDIR" in reasons["DICOMDIR"]
    assert "no pixel data" in reasons["report_sr.dcm"]
    assert "truncated" in reasons["truncated.dcm"]
    assert "header_cut.dcm" in reasons


def test_volume_values_geometry_match_simpleitk(dicom_folder):
    series, _ = discover_series(dicom_folder["root"])
    for key in ("a", "b"):
        info = next(s for s in series if s.uid == dicom_folder[key]["uid"])
        volume, affine = load_series_volume(info)
        reference = _read_sitk_series(dicom_folder["root"] / "mixed", info.uid)
        np.testing.assert_allclose(affine, _sitk_affine_ras(reference), atol=1e-4)
        np.testing.assert_allclose(volume, sitk.GetArrayFromImage(reference), atol=1e-4)  # rescale applied, signed
    a = next(s for s in series if s.uid == dicom_folder["a"]["uid"])
    _, affine = load_series_volume(a)
    # axial, identity orientation: RAS diagonal is (-column spacing, -row spacing, slice spacing)
    np.testing.assert_allclose(np.diag(affine)[:3], [-0.7, -0.5, 2.0])
    np.testing.assert_allclose(affine[:3, 3], [10.0, 20.0, 30.0])
    b_info = next(s for s in series if s.uid == dicom_folder["b"]["uid"])
    b_volume, _ = load_series_volume(b_info)
    assert b_volume.min() < 0  # signed 16-bit with slope 2 / intercept -100


def test_geometry_warnings_and_repeated_positions(tmp_path):
    """Missing slices and a tilted gantry are warned about; repeated positions (echoes) are split."""
    study_uid = generate_uid()
    gap = tmp_path / "gap"
    gap.mkdir()
    write_mr_series(gap, study_uid, [(0.0, 0.0, z) for z in (0, 2, 4, 8, 10)], AXIAL, 8, 8, (1.0, 1.0))
    tilted = tmp_path / "tilted"
    tilted.mkdir()
    tilted_positions = [(0.0, 0.3 * k, 2.0 * k) for k in range(5)]  # each slice shifted in y: ~8.5 degrees
    write_mr_series(tilted, study_uid, tilted_positions, AXIAL, 8, 8, (1.0, 1.0))
    echoes = tmp_path / "echoes"
    echoes.mkdir()
    write_mr_series(echoes, study_uid, [(0.0, 0.0, float(z // 2)) for z in range(8)], AXIAL, 8, 8, (1.0, 1.0))

    (gap_series,), _ = discover_series(gap)
    assert any("missing slice" in w for w in gap_series.warnings)
    assert gap_series.spacing[2] == pytest.approx(2.0)
    (tilted_series,), _ = discover_series(tilted)
    assert any("tilted gantry" in w for w in tilted_series.warnings)
    np.testing.assert_allclose(series_affine(tilted_series)[:3, 2], [0.0, -0.3, 2.0])  # the true (sheared) step
    tilted_rows = predict_dicom_folder(
        tilted, tmp_path / "out_tilted", DummyPredictor(), write_dicom=False, progress=False
    )
    assert tilted_rows[0]["status"] == "ok" and "tilted gantry" in tilted_rows[0]["warnings"]
    stacks, _ = discover_series(echoes)
    assert [s.stack_index for s in stacks] == [1, 2] and all(s.num_frames == 4 for s in stacks)
    assert len({s.name for s in stacks}) == 2


def test_iter_slices_streams_and_reformats(dicom_folder, tmp_path):
    series, _ = discover_series(dicom_folder["root"])
    a = next(s for s in series if s.uid == dicom_folder["a"]["uid"])
    window = compute_intensity_window(a)
    volume, _ = load_series_volume(a)
    expected = np.clip((volume - window[0]) / (window[1] - window[0]), 0, 1)
    batches = list(iter_series_slices(a, batch_size=4, window=window))
    assert [b[1].shape for b in batches] == [(4, 1, 32, 40), (2, 1, 32, 40)]
    np.testing.assert_allclose(np.concatenate([b[1][:, 0] for b in batches]), expected, atol=1e-6)
    along_rows = np.concatenate(
        [b[1][:, 0] for b in iter_series_slices(a, 8, axis=1, window=window, scratch_dir=tmp_path)]
    )
    np.testing.assert_allclose(along_rows, expected.transpose(1, 0, 2), atol=1e-6)
    along_cols = np.concatenate(
        [b[1][:, 0] for b in iter_series_slices(a, 8, axis=2, window=window, scratch_dir=tmp_path)]
    )
    np.testing.assert_allclose(along_cols, expected.transpose(2, 0, 1), atol=1e-6)
    assert not list(tmp_path.iterdir())  # the reformatting memmap is cleaned up


# --------------------------------------------------------------------------------------------
# folder inference and outputs
# --------------------------------------------------------------------------------------------


def test_results_csv_rows_and_error_row(dicom_folder, folder_run):
    rows = _read_results(folder_run["output"])
    ok = {r["series_uid"]: r for r in rows if r["status"] == "ok"}
    errors = [r for r in rows if r["status"] == "error"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert set(ok) == {dicom_folder[k]["uid"] for k in ("a", "b", "multiframe")}
    assert len(errors) == 1 and errors[0]["series_uid"] == dicom_folder["compressed"]["uid"]
    if not pydicom.pixels.get_decoder(JPEGLosslessSV1).is_available:
        assert "pip install" in errors[0]["message"] and "pylibjpeg" in errors[0]["message"]
    assert not (folder_run["output"] / errors[0]["series_dir"]).exists()  # nothing half-written
    assert {Path(r["skipped_files"]).name for r in skipped} == {
        "notes.txt",
        "DICOMDIR",
        "report_sr.dcm",
        "header_cut.dcm",
    }
    row_a = ok[dicom_folder["a"]["uid"]]
    assert row_a["slices"] == "6" and "truncated.dcm" in row_a["skipped_files"]
    assert row_a["decision"] in {"normal", "anomalous"} and len(row_a["top_slices"].split(";")) == 3
    assert len(folder_run["rows"]) == len(rows)
    assert folder_run["predictor"].largest_batch == 4
    leftovers = [
        p.name for p in folder_run["output"].iterdir() if p.name.startswith(".") and p.name != OUTPUT_MARKER_NAME
    ]
    assert not leftovers  # no staging folders or temporary files left (only the output-folder marker)


def test_nifti_output_has_source_geometry(dicom_folder, folder_run):
    series, _ = discover_series(dicom_folder["root"])
    for key in ("a", "b"):
        info = next(s for s in series if s.uid == dicom_folder[key]["uid"])
        image = nib.load(folder_run["output"] / info.name / "anomaly_map.nii.gz")
        np.testing.assert_allclose(image.affine, series_affine(info), atol=1e-5)
        np.testing.assert_allclose(image.get_sform(), series_affine(info), atol=1e-5)
        assert image.shape == (info.cols, info.rows, info.num_frames)
        # the map is the windowed image: slice k of the NIfTI is source slice k
        window = compute_intensity_window(info)
        volume, _ = load_series_volume(info)
        expected = np.clip((volume - window[0]) / (window[1] - window[0]), 0, 1)
        np.testing.assert_allclose(np.asarray(image.dataobj).transpose(2, 1, 0), expected, atol=1e-6)
        # ITK (what 3D Slicer uses) puts the map exactly on the source series
        source = _read_sitk_series(dicom_folder["root"] / "mixed", info.uid)
        overlay = sitk.ReadImage(str(folder_run["output"] / info.name / "anomaly_map.nii.gz"))
        assert overlay.GetSize() == source.GetSize()
        np.testing.assert_allclose(overlay.GetOrigin(), source.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(overlay.GetSpacing(), source.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(overlay.GetDirection(), source.GetDirection(), atol=1e-4)
        uncertainty = nib.load(folder_run["output"] / info.name / "uncertainty_map.nii.gz")
        np.testing.assert_allclose(uncertainty.affine, image.affine)
    report = json.loads((folder_run["output"] / dicom_folder["a"]["uid"] / "report.json").read_text())
    assert report["volume_score"] == pytest.approx(max(report["slice_scores"]))
    assert report["top_slices"][0]["sop_instance_uid"] in dicom_folder["a"]["sop_uids"]


@needs_highdicom
def test_parametric_map_references_source(dicom_folder, folder_run):
    series, _ = discover_series(dicom_folder["root"])
    a = next(s for s in series if s.uid == dicom_folder["a"]["uid"])
    pm = pydicom.dcmread(folder_run["output"] / a.name / "anomaly_map_pm.dcm")
    assert pm.SOPClassUID == ParametricMapStorage
    assert pm.StudyInstanceUID == dicom_folder["study_uid"]
    assert pm.FrameOfReferenceUID == dicom_folder["a"]["for_uid"]
    assert pm.SeriesInstanceUID != a.uid
    referenced_series = pm.ReferencedSeriesSequence[0]
    assert referenced_series.SeriesInstanceUID == a.uid
    referenced = {item.ReferencedSOPInstanceUID for item in referenced_series.ReferencedInstanceSequence}
    assert referenced == set(dicom_folder["a"]["sop_uids"])
    # every frame (highdicom orders them along the normal itself) names its source slice, sits at
    # that slice's position and holds that slice's map
    nifti = np.asarray(nib.load(folder_run["output"] / a.name / "anomaly_map.nii.gz").dataobj).transpose(2, 1, 0)
    sorted_index = {ref.sop_instance_uid: k for k, ref in enumerate(a.slices)}
    assert pm.NumberOfFrames == a.num_frames
    for frame_number, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        k = sorted_index[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(a.positions[k])
        np.testing.assert_allclose(pm.pixel_array[frame_number], nifti[k], atol=1e-6)

    # multi-frame source: the PM frames follow the source frames
    mf = next(s for s in series if s.uid == dicom_folder["multiframe"]["uid"])
    mf_pm = pydicom.dcmread(folder_run["output"] / mf.name / "anomaly_map_pm.dcm")
    assert (
        mf_pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        == dicom_folder["multiframe"]["sop_uids"][0]
    )
    mf_nifti = np.asarray(nib.load(folder_run["output"] / mf.name / "anomaly_map.nii.gz").dataobj).transpose(2, 1, 0)
    sorted_index = {ref.frame_index + 1: k for k, ref in enumerate(mf.slices)}
    for frame_number, frame in enumerate(mf_pm.PerFrameFunctionalGroupsSequence):
        k = sorted_index[int(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)]
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(mf.positions[k])
        np.testing.assert_allclose(mf_pm.pixel_array[frame_number], mf_nifti[k], atol=1e-6)


@needs_highdicom
def test_segmentation_references_source(dicom_folder, folder_run):
    import highdicom as hd

    b_uid = dicom_folder["b"]["uid"]
    seg = hd.seg.segread(folder_run["output"] / b_uid / "anomaly_seg.dcm")
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.FrameOfReferenceUID == dicom_folder["b"]["for_uid"]
    assert seg.StudyInstanceUID == dicom_folder["study_uid"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == b_uid
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(dicom_folder["b"]["sop_uids"])
    assert len(seg.SegmentSequence) == 1


def test_no_patient_identifiers_in_names_or_logs(folder_run):
    output = folder_run["output"]
    for path in output.rglob("*"):
        assert not any(text in str(path.relative_to(output)) for text in PHI_STRINGS), path
    for text_file in [output / "results.csv", *output.rglob("report.json")]:
        content = text_file.read_text()
        assert not any(text in content for text in PHI_STRINGS), text_file
    assert folder_run["log"] and not any(text in folder_run["log"] for text in PHI_STRINGS)


def test_reformatted_axis_gives_same_maps(dicom_folder, folder_run, tmp_path):
    """The dummy map is pointwise, so cutting along rows or columns must give the same volume."""
    source = tmp_path / "in"
    source.mkdir()
    for path in dicom_folder["a"]["paths"]:
        (source / path.name).write_bytes(path.read_bytes())
    reference = np.asarray(nib.load(folder_run["output"] / dicom_folder["a"]["uid"] / "anomaly_map.nii.gz").dataobj)
    for axis in (1, 2):
        output = tmp_path / f"out_axis{axis}"
        rows = predict_dicom_folder(
            source,
            output,
            DummyPredictor(),
            axis=axis,
            batch_size=5,
            write_dicom=False,
            volume_aggregation="topk_mean",
            top_k=2,
            progress=False,
        )
        assert rows[0]["status"] == "ok", rows[0]["message"]
        image = nib.load(output / dicom_folder["a"]["uid"] / "anomaly_map.nii.gz")
        np.testing.assert_allclose(np.asarray(image.dataobj), reference, atol=1e-6)
        report = json.loads((output / dicom_folder["a"]["uid"] / "report.json").read_text())
        assert len(report["slice_scores"]) == (32 if axis == 1 else 40)
        assert report["volume_score"] == pytest.approx(np.mean(sorted(report["slice_scores"])[-2:]))


def test_multiframe_oct_and_rgb(tmp_path):
    """Ophthalmic Tomography B-scans are the slices; an RGB image reaches the predictor with 3 channels."""
    source = tmp_path / "oct_export"
    source.mkdir()
    study_uid = generate_uid()
    oct_scan = write_multiframe(
        source / "oct.dcm",
        study_uid,
        OphthalmicTomographyImageStorage,
        "OPT",
        frames=5,
        rows=16,
        cols=24,
        dtype=np.uint8,
    )
    rgb_uid = write_rgb_image(source / "photo.dcm", study_uid)
    series, skipped = discover_series(source)
    assert not skipped
    oct_info = next(s for s in series if s.uid == oct_scan["uid"])
    assert oct_info.modality == "OPT" and oct_info.is_multiframe and oct_info.num_frames == 5
    rgb_info = next(s for s in series if s.uid == rgb_uid)
    assert rgb_info.is_rgb and any("no patient geometry" in w for w in rgb_info.warnings)

    predictor = DummyPredictor()
    rows = predict_dicom_folder(source, tmp_path / "out", predictor, write_dicom=False, progress=False)
    assert {r["status"] for r in rows} == {"ok"}
    assert predictor.channels_seen == {1, 3}
    report = json.loads((tmp_path / "out" / oct_scan["uid"] / "report.json").read_text())
    assert len(report["slice_scores"]) == 5
    assert [t["frame_number"] for t in report["top_slices"]][0] == 1  # frame 1 is the brightest (top) B-scan


def test_missing_highdicom_skips_dicom_with_hint(dicom_folder, tmp_path, monkeypatch):
    import ura_monai.inference.dicom_inference as dicom_inference

    monkeypatch.setattr(dicom_inference, "highdicom_available", lambda: False)
    source = tmp_path / "in"
    source.mkdir()
    for path in dicom_folder["b"]["paths"]:
        (source / path.name).write_bytes(path.read_bytes())
    predict_dicom_folder(source, tmp_path / "out", DummyPredictor(), progress=False)
    series_dir = tmp_path / "out" / dicom_folder["b"]["uid"]
    assert not list(series_dir.glob("*.dcm"))
    report = json.loads((series_dir / "report.json").read_text())
    assert any("pip install ura-monai[dicom]" in w for w in report["warnings"])


def test_core_imports_without_highdicom():
    code = (
        "import sys; sys.modules['highdicom'] = None\n"
        "import ura_monai.data.dicom, ura_monai.inference.dicom_inference as m\n"
        "assert not m.highdicom_available()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_refuses_overlapping_folders_and_empty_input(dicom_folder, tmp_path):
    root = dicom_folder["root"]
    with pytest.raises(ValueError, match="inside the input folder"):
        predict_dicom_folder(root, root / "results", DummyPredictor(), progress=False)
    with pytest.raises(ValueError, match="inside the input folder"):
        predict_dicom_folder(root, root, DummyPredictor(), progress=False)
    assert not (root / "results").exists()
    with pytest.raises(ValueError, match="inside the output folder"):
        predict_dicom_folder(root, root.parent, DummyPredictor(), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        predict_dicom_folder(empty, tmp_path / "out", DummyPredictor(), progress=False)
    junk_only = tmp_path / "junk"
    junk_only.mkdir()
    (junk_only / "readme.txt").write_text("nothing")
    with pytest.raises(ValueError, match="no DICOM image series"):
        predict_dicom_folder(junk_only, tmp_path / "out2", DummyPredictor(), progress=False)
    with pytest.raises(FileNotFoundError):
        predict_dicom_folder(tmp_path / "missing", tmp_path / "out3", DummyPredictor(), progress=False)


def test_dicom_slice_datalist(dicom_folder, tmp_path):
    items = dicom_slice_datalist(dicom_folder["root"], tmp_path / "cache", modalities=["MR"])
    # the compressed series cannot be decoded here (or holds garbage): it is left out
    per_series = {}
    for item in items:
        per_series.setdefault(item["category"], []).append(item)
    assert len(per_series[dicom_folder["a"]["uid"]]) == 6 and len(per_series[dicom_folder["b"]["uid"]]) == 5
    assert dicom_folder["compressed"]["uid"] not in per_series
    first = items[0]
    assert (first["label"], first["mask"], first["has_mask"], first["defect_type"]) == (0, None, False, "good")
    image = np.load(first["image"])
    assert image.dtype == np.float32 and image.ndim == 2 and 0.0 <= image.min() and image.max() <= 1.0
    again = dicom_slice_datalist(dicom_folder["root"], tmp_path / "cache", modalities=["MR"])  # cached
    assert [i["image"] for i in again] == [i["image"] for i in items]
    with pytest.raises(ValueError, match="inside the input folder"):
        dicom_slice_datalist(dicom_folder["root"], dicom_folder["root"] / "cache")


def test_atomic_writes(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "one")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("two")
            raise RuntimeError("interrupted")
    assert target.read_text() == "one"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


# --------------------------------------------------------------------------------------------
# the real MR series
# --------------------------------------------------------------------------------------------


def test_shared_mr_series(shared_data, tmp_path):
    folder = shared_data / "dicom" / "mr_brain_sagittal"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    series, skipped = discover_series(folder)
    assert len(series) == 1 and not skipped
    info = series[0]
    assert (info.num_frames, info.rows, info.cols, info.modality) == (192, 256, 256, "MR")
    assert info.spacing == pytest.approx((0.859375, 0.859375, 0.9), abs=1e-3)
    distances = np.asarray(info.positions) @ np.cross(info.orientation[:3], info.orientation[3:])
    assert np.all(np.diff(distances) > 0)
    assert not info.warnings
    reference = _read_sitk_series(folder, info.uid)
    np.testing.assert_allclose(series_affine(info), _sitk_affine_ras(reference), atol=1e-4)

    rows = predict_dicom_folder(folder, tmp_path / "out", DummyPredictor(), batch_size=32, progress=False)
    assert [r["status"] for r in rows] == ["ok"]
    series_dir = tmp_path / "out" / info.uid
    image = nib.load(series_dir / "anomaly_map.nii.gz")
    assert image.shape == (256, 256, 192)
    np.testing.assert_allclose(image.affine, _sitk_affine_ras(reference), atol=1e-4)
    if highdicom_available():
        pm = pydicom.dcmread(series_dir / "anomaly_map_pm.dcm", stop_before_pixels=True)
        assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == info.uid
        assert len(pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 192
        assert pm.FrameOfReferenceUID == info.frame_of_reference_uid
