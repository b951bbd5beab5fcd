"""`deid make-dataset`: reproducibility, resume, refusals, verification, and the training reader."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import deid.train.make_dataset as md
from deid.dataset import GeneratedDataset, image_relpath, verify_dataset
from deid.errors import DatasetError
from deid.media.images import to_uint8
from deid.train.make_dataset import MakeDatasetConfig, make_dataset, sample_z
from tests.ranks import OWN_PROCESSES


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_samples_are_the_generator_output_for_their_own_z(tiny_dataset, tiny_generator):
    ds = GeneratedDataset(tiny_dataset)
    assert len(ds) == 24 and ds.manifest["generator_fingerprint"] == tiny_generator.fingerprint
    assert ds.manifest["resolution"] == 32 and ds.manifest["w_dim"] == 64 and ds.manifest["count"] == 24
    for i in (0, 13, 23):
        image, w = ds[i]
        z = sample_z(0, i, tiny_generator.z_dim)[None]
        expect_w = tiny_generator.mapping(z)
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and w.dtype == torch.float32
        assert torch.allclose(w, expect_w[0], atol=1e-6)
        expect = tiny_generator.synthesis(expect_w).clamp(-1, 1)[0]
        assert (image - expect).abs().max() <= 1 / 127.5 + 1e-6  # 8-bit quantisation only
        assert np.array_equal(ds.image_uint8(i), to_uint8(tiny_generator.synthesis(expect_w))[0])


def test_resume_equals_uninterrupted(tmp_path, tiny_generator, monkeypatch):
    config = MakeDatasetConfig(out=tmp_path / "a", n=17, generator="random", seed=3, truncation=0.7, batch_size=4,
                               device="cpu")
    make_dataset(config, generator=tiny_generator)

    interrupted = MakeDatasetConfig(**{**config.__dict__, "out": tmp_path / "b"})
    real_write = md.DatasetWriter.write_batch
    calls = []

    def write_then_die(self, start, blobs, ws):
        if len(calls) == 2:
            # half-written batch: one image lands, then the process dies (no part file)
            (self.root / image_relpath(start)).parent.mkdir(parents=True, exist_ok=True)
            (self.root / image_relpath(start)).write_bytes(blobs[0][:10])
            raise KeyboardInterrupt
        calls.append(start)
        real_write(self, start, blobs, ws)

    monkeypatch.setattr(md.DatasetWriter, "write_batch", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(interrupted, generator=tiny_generator)
    monkeypatch.setattr(md.DatasetWriter, "write_batch", real_write)
    assert not (tmp_path / "b" / "manifest.json").exists()
    with pytest.raises(DatasetError, match="--resume"):
        make_dataset(interrupted, generator=tiny_generator)
    with pytest.raises(DatasetError, match="interrupted run"):
        GeneratedDataset(tmp_path / "b")
    resumed = MakeDatasetConfig(**{**interrupted.__dict__, "resume": True, "batch_size": 6})  # run's size wins
    make_dataset(resumed, generator=tiny_generator)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    verify_dataset(tmp_path / "b", deep=True)


def test_refuses_foreign_or_different_output(tmp_path, tiny_generator, tiny_dataset):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        make_dataset(MakeDatasetConfig(out=tmp_path / "x", n=4, generator="random", device="cpu"), generator=tiny_generator)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"
    with pytest.raises(DatasetError, match="different dataset.*seed"):
        make_dataset(MakeDatasetConfig(out=tiny_dataset, n=24, seed=1, generator="random", device="cpu"),
                     generator=tiny_generator)
    before = _files(tiny_dataset)
    make_dataset(MakeDatasetConfig(out=tiny_dataset, n=24, generator="random", device="cpu"), generator=tiny_generator)
    assert _files(tiny_dataset) == before  # complete already: nothing rewritten


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_verify_catches_truncated_missing_and_corrupted(tmp_path, tiny_dataset):
    verify_dataset(tiny_dataset, deep=True)
    cut = _copy(tiny_dataset, tmp_path / "cut")
    png = cut / image_relpath(7)
    png.write_bytes(png.read_bytes()[:-20])
    with pytest.raises(DatasetError, match="00000007.png has .* bytes.*truncated"):
        verify_dataset(cut)
    gone = _copy(tiny_dataset, tmp_path / "gone")
    (gone / image_relpath(23)).unlink()
    with pytest.raises(DatasetError, match="00000023.png is missing"):
        verify_dataset(gone)
    flipped = _copy(tiny_dataset, tmp_path / "flipped")
    data = bytearray((flipped / image_relpath(2)).read_bytes())
    data[60] ^= 0xFF
    (flipped / image_relpath(2)).write_bytes(bytes(data))
    verify_dataset(flipped)  # same size: only the deep check can see it
    with pytest.raises(DatasetError, match="00000002.png is corrupted"):
        verify_dataset(flipped, deep=True)
    ws = _copy(tiny_dataset, tmp_path / "ws")
    arr = np.load(ws / "ws.npy")
    arr[0, 0] += 1
    np.save(ws / "ws.npy", arr)
    with pytest.raises(DatasetError, match="ws.npy"):
        verify_dataset(ws)


def test_cli_make_dataset_and_verify(tmp_path, monkeypatch, tiny_generator):
    from deid import cli

    real = md.load_generator
    monkeypatch.setattr(md, "load_generator", lambda source, device="cpu": tiny_generator if source == "tiny" else real(source, device))
    out = tmp_path / "cli_ds"
    runner = CliRunner()
    result = runner.invoke(cli.cli, ["make-dataset", "--n", "5", "--out", str(out), "--generator", "tiny",
                                     "--seed", "2", "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 5 and manifest["seed"] == 2 and manifest["generator"] == "random"
    result = runner.invoke(cli.cli, ["make-dataset", "--verify", str(out)])
    assert result.exit_code == 0, result.output
    (out / image_relpath(4)).unlink()
    result = runner.invoke(cli.cli, ["make-dataset", "--verify", str(out)])
    assert result.exit_code != 0 and "00000004.png is missing" in str(result.exception)


def test_manifest_names_the_generator_file(tmp_path, tiny_generator, tiny_generator_file):
    from deid.stylegan.loading import convert_generator
    from deid.weights import file_sha256

    copy = convert_generator(tiny_generator_file, tmp_path / "copy.safetensors")  # also exercises the import converter
    manifest = make_dataset(MakeDatasetConfig(out=tmp_path / "ds", n=2, generator=str(copy), device="cpu"))
    assert manifest["generator"] == str(copy) and manifest["generator_sha256"] == file_sha256(copy)
    assert manifest["generator_fingerprint"] == tiny_generator.fingerprint


def test_dataloader_workers_read_pairs(tiny_dataset):
    loader = torch.utils.data.DataLoader(GeneratedDataset(tiny_dataset), batch_size=8, num_workers=2)
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(8, 3, 32, 32)] * 3 and batches[0][1].shape == (8, 64)
    assert -1 <= float(batches[0][0].min()) and float(batches[0][0].max()) <= 1


def _make_dataset_rank(rank: int, port: int, out: str, results) -> None:
    """One torchrun-like process of a 2-process make-dataset (gloo); reports (rank, message, monotonic time)."""
    import os
    import time

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from deid.errors import DeidError
    from deid.nets.presets import TINY_GENERATOR_CONFIG
    from deid.stylegan.loading import load_generator

    generator = load_generator("random", config=TINY_GENERATOR_CONFIG, seed=0)
    try:
        make_dataset(MakeDatasetConfig(out=Path(out), n=8, generator="random", batch_size=4, device="cpu"), generator=generator)
        results.put((rank, "finished", time.monotonic()))
    except DeidError as exc:
        results.put((rank, str(exc), time.monotonic()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@OWN_PROCESSES
@pytest.mark.slow
def test_when_rank_0_fails_while_preparing_rank_1_stops_at_once_with_its_message(tmp_path):
    """Rank 0 refuses a non-empty --out; without sharing the failure rank 1 would wait in a collective until the
    process group's timeout (30 minutes for gloo, 10 for NCCL)."""
    import multiprocessing
    import socket

    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_make_dataset_rank, args=(rank, port, str(out), results)) for rank in range(2)]
    for p in processes:
        p.start()
    try:
        reports = {rank: (message, at) for rank, message, at in (results.get(timeout=120) for _ in processes)}
    finally:
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert "is not empty" in reports[0][0]
    assert reports[1][0] == f"rank 0 failed: {reports[0][0]}"
    assert abs(reports[1][1] - reports[0][1]) < 5.0  # seconds, not the collective's timeout
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_make_dataset_restores_the_process_wide_cudnn_and_tf32_flags(tmp_path, tiny_generator):
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    seen = []
    real_generate = md.DatasetWriter.generate

    def generate(self, start, stop, device):
        seen.append((cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32))
        return real_generate(self, start, stop, device)

    try:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = False, True, True, True
        md.DatasetWriter.generate = generate
        make_dataset(MakeDatasetConfig(out=tmp_path / "ds", n=3, generator="random", batch_size=2, device="cpu"),
                     generator=tiny_generator)
        assert seen and set(seen) == {(True, False, False, False)}  # exact arithmetic while generating
        assert (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == (False, True, True, True)
    finally:
        md.DatasetWriter.generate = real_generate
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_truncation_psi_and_cutoff_are_applied_and_recorded(tmp_path, tiny_generator, monkeypatch):
    """ψ pulls each stored w toward w_avg on every style row, and the image is the synthesis of that one w;
    the manifest records ψ and the rows it reaches. The tiny generator has 8 style rows."""
    from deid import cli

    assert tiny_generator.num_ws == 8
    monkeypatch.setattr(md, "load_generator", lambda source, device="cpu": tiny_generator)
    out = tmp_path / "psi"
    result = CliRunner().invoke(cli.cli, ["make-dataset", "--n", "3", "--out", str(out), "--generator", "tiny",
                                          "--truncation", "0.7", "--truncation-cutoff", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    ds = GeneratedDataset(out)
    assert (ds.manifest["truncation"], ds.manifest["truncation_cutoff"], ds.manifest["num_ws"]) == (0.7, 8, 8)
    w_avg = tiny_generator.mapping.w_avg
    for i in range(3):
        image, w = ds[i]
        untruncated = tiny_generator.mapping(sample_z(0, i, tiny_generator.z_dim)[None])[0]
        torch.testing.assert_close(w, w_avg + 0.7 * (untruncated - w_avg), rtol=1e-5, atol=1e-5)
        # one w made the whole image: every row read the stored w
        expect = tiny_generator.synthesis(w[None].expand(tiny_generator.num_ws, -1)[None]).clamp(-1, 1)[0]
        assert (image - expect).abs().max() <= 1 / 127.5 + 1e-5
    # the default: no truncation, every row (the stored w is the mapping's own)
    plain = make_dataset(MakeDatasetConfig(out=tmp_path / "plain", n=1, device="cpu"), generator=tiny_generator)
    assert (plain["truncation"], plain["truncation_cutoff"]) == (1.0, 8)
    torch.testing.assert_close(GeneratedDataset(tmp_path / "plain")[0][1],
                               tiny_generator.mapping(sample_z(0, 0, tiny_generator.z_dim)[None])[0])


def test_a_truncation_cutoff_short_of_every_style_row_is_refused_with_psi_below_one(tmp_path, tiny_generator):
    """Rows after K would keep the untruncated w: an image made by two w's, which deid's one-w mapper cannot
    reproduce. Refused before anything is written; with ψ = 1 a cutoff changes nothing and is accepted."""
    out = tmp_path / "wplus"
    with pytest.raises(DatasetError, match=r"first 4 of the generator's 8 style rows.*Omit --truncation-cutoff"):
        make_dataset(MakeDatasetConfig(out=out, n=2, truncation=0.7, truncation_cutoff=4, device="cpu"),
                     generator=tiny_generator)
    assert not out.exists()
    manifest = make_dataset(MakeDatasetConfig(out=out, n=2, truncation_cutoff=4, device="cpu"), generator=tiny_generator)
    assert (manifest["truncation"], manifest["truncation_cutoff"]) == (1.0, 4)
    wide = make_dataset(MakeDatasetConfig(out=tmp_path / "wide", n=2, truncation=0.5, truncation_cutoff=18, device="cpu"),
                        generator=tiny_generator)
    assert wide["truncation_cutoff"] == 8  # all the rows there are
    # a different cutoff is a different dataset: resuming into `out` with another one is refused
    with pytest.raises(DatasetError, match="truncation_cutoff 4"):
        make_dataset(MakeDatasetConfig(out=out, n=2, device="cpu"), generator=tiny_generator)
